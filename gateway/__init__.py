"""canarygate: a gateway in front of a model API that slows extraction, marks what it serves and records it."""
