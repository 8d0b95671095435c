FROM python:3.11-slim
WORKDIR /srv/canarygate
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . && useradd --system canarygate && mkdir /data && chown canarygate /data
USER canarygate
WORKDIR /data
ENV CANARYGATE_UPSTREAM_API_KEY=""
EXPOSE 8080
# Mount a folder holding canarygate.toml and the state folder at /data.
CMD ["canarygate", "serve", "--host", "0.0.0.0", "--port", "8080"]
