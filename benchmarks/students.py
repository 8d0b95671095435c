"""Student language models for the distillation experiments, and an OpenAI-compatible server for one.

A student is a word-level recurrent language model (an embedding, one GRU layer, a softmax over the
words it has seen) trained from scratch by gradient descent on the CPU: small enough to train in minutes
on two cores, real enough that what it carries of its training text is what it learned, not what it
copied. It reads an instruction, then writes an answer, as the chat models it imitates do.

The server speaks the two routes a probe needs: chat completions (the student answers a prompt) and
completions with `echo` and `logprobs` (the student scores given texts, token by token, as vLLM and
llama.cpp servers do). Texts scored together usually share a long context, so the context is run once
and only the differing ends are run as a batch.

    pip install torch      # the CPU build; only these experiments need it
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

TOKEN = re.compile(r"[a-z]+(?:['’-][a-z]+)*|[0-9]+|\n|[^\sa-z0-9]")
NO_SPACE_BEFORE = set(",.;:!?)'’”")
ANSWER, END, UNKNOWN = "<answer>", "</s>", "<unk>"


def tokens_of(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def spans_of(text: str) -> list[tuple[str, int]]:
    """(token, character offset) for every token of `text`."""
    return [(m.group(), m.start()) for m in TOKEN.finditer(text.lower())]


def detokenise(tokens: list[str]) -> str:
    out: list[str] = []
    for token in tokens:
        if out and token not in NO_SPACE_BEFORE and token != "\n" and out[-1] != "\n":
            out.append(" ")
        out.append(token)
    return "".join(out)


def student_name(mix: float, seed: int) -> str:
    """A student's name, which also seeds its choice of marked answers (benchmarks/distill.py)."""
    return f"control-seed{seed}" if mix == 0 else f"marked-{mix * 100:g}pct-seed{seed}"


def sequence_of(pair: tuple[str, str]) -> list[str]:
    """An (instruction, answer) pair as the student reads it: the instruction, <answer>, the answer, </s>."""
    question, answer = pair
    return [*tokens_of(question), ANSWER, *tokens_of(answer), END]


def vocabulary_of(sequences: list[list[str]], size: int) -> list[str]:
    """The special tokens, then the commonest words of `sequences`, `size` in all."""
    counts = Counter(t for s in sequences for t in s if t not in (ANSWER, END))
    return [UNKNOWN, END, ANSWER, *[t for t, _ in counts.most_common(size - 3)]]


@dataclass
class Training:
    sequences: int
    tokens: int
    vocabulary: int
    parameters: int
    steps: int
    seconds: float
    final_loss: float | None


class Student:
    """A trained word-level GRU: generate answers, score texts."""

    def __init__(self, vocab: list[str], model) -> None:
        self.vocab = vocab
        self.index = {t: i for i, t in enumerate(vocab)}
        self.model = model.eval()
        self.lock = threading.Lock()  # one forward pass at a time: the server's workers share the model

    @classmethod
    def train(cls, pairs: list[tuple[str, str]], seconds: float, seed: int, vocabulary: int = 10000):
        """Train on (instruction, answer) pairs for `seconds` of wall time; returns (student, Training)."""
        import torch

        torch.manual_seed(seed)
        sequences = list(map(sequence_of, pairs))
        vocab = vocabulary_of(sequences, vocabulary)
        index = {t: i for i, t in enumerate(vocab)}
        order = list(range(len(sequences)))
        random.Random(seed).shuffle(order)
        stream = torch.tensor([index.get(t, 0) for i in order for t in sequences[i]])
        model = _network(len(vocab))
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        started, steps, window, batch, loss = time.monotonic(), 0, 64, 64, None
        generator = torch.Generator().manual_seed(seed)
        while time.monotonic() - started < seconds:
            starts = torch.randint(0, len(stream) - window - 1, (batch,), generator=generator)
            x = torch.stack([stream[s : s + window] for s in starts])
            y = torch.stack([stream[s + 1 : s + window + 1] for s in starts])
            hidden, _ = model.hidden(x)
            loss = model.out(hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1)).loss
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            steps += 1
        parameters = sum(p.numel() for p in model.parameters())
        final = None if loss is None else round(float(loss.detach()), 3)
        info = Training(len(sequences), len(stream), len(vocab), parameters, steps,
                        round(time.monotonic() - started, 1), final)  # fmt: skip
        return cls(vocab, model), info

    def save(self, path) -> None:
        import torch

        torch.save({"vocab": self.vocab, "state": self.model.state_dict()}, path)

    @classmethod
    def load(cls, path) -> Student:
        import torch

        saved = torch.load(path, weights_only=False)
        model = _network(len(saved["vocab"]))
        model.load_state_dict(saved["state"])
        return cls(saved["vocab"], model)

    def answer(self, prompt: str, max_tokens: int, temperature: float, seed: int) -> tuple[str, str]:
        """(text, finish reason) of the student's answer to `prompt`."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        ids = [self.index.get(t, 0) for t in tokens_of(prompt)[-400:]] + [self.index[ANSWER]]
        out, finish = [], "length"
        with self.lock, torch.no_grad():
            logprobs, state = self.model(torch.tensor([ids]))
            for _ in range(max_tokens):
                tempered = logprobs[0, -1] / max(temperature, 1e-4)
                tempered[0] = tempered[2] = float("-inf")  # never write <unk> or <answer>
                token = int(torch.multinomial(torch.softmax(tempered, -1), 1, generator=generator))
                if token == 1:
                    finish = "stop"
                    break
                out.append(self.vocab[token])
                logprobs, state = self.model(torch.tensor([[token]]), state)
        return detokenise(out), finish

    def score(self, texts: list[str]) -> list[dict]:
        """Per text, OpenAI-style echo log-probabilities: tokens, token_logprobs (None first), text_offset.
        The prefix the texts share is run once; the rest of each text is run as one batch from there."""
        import torch

        spans = [spans_of(t) for t in texts]
        ids = [[self.index.get(tok, 0) for tok, _ in s] for s in spans]
        shared = _common_prefix(ids)
        with self.lock, torch.no_grad():
            logprobs, state = self.model(torch.tensor([ids[0][:shared]]))
            prefix = [None] + [float(logprobs[0, j - 1, ids[0][j]]) for j in range(1, shared)]
            rests = self._continue([i[shared:] for i in ids], logprobs[:, -1:], state)
        return [
            {
                "tokens": [tok for tok, _ in s],
                "token_logprobs": prefix + rest,
                "text_offset": [offset for _, offset in s],
                "top_logprobs": None,
            }  # fmt: skip
            for s, rest in zip(spans, rests, strict=True)
        ]

    def _continue(self, rests: list[list[int]], last, state) -> list[list[float]]:
        """Log-probabilities of each continuation's tokens, all from the same state (`last`: the log-
        probabilities of the token after the prefix)."""
        import torch

        longest = max(len(r) for r in rests)
        if longest == 0:
            return [[] for _ in rests]
        padded = torch.tensor([r + [1] * (longest - len(r)) for r in rests])
        first = last[0, 0][padded[:, 0]].unsqueeze(1)
        if longest == 1:
            return [[float(first[b, 0])] for b in range(len(rests))]
        hidden, _ = self.model.hidden(padded[:, :-1], state.expand(-1, len(rests), -1).contiguous())
        targets = padded[:, 1:].reshape(-1)
        later = self.model.out(hidden.reshape(-1, hidden.shape[-1]), targets).output.reshape(len(rests), -1)
        picked = torch.cat([first, later], 1)
        return [[float(v) for v in picked[b, : len(r)]] for b, r in enumerate(rests)]


def _common_prefix(rows: list[list[int]]) -> int:
    """The length of the prefix all rows share, leaving at least one token of each row to score."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return max(n, 1)


def _network(vocabulary: int, embedding: int = 128, hidden: int = 384):
    """The CPU students' sizes by default; benchmarks/distill_gpu.py trains larger ones."""
    from torch import nn

    class GRULanguageModel(nn.Module):
        """Words are frequency-ranked, so an adaptive softmax (Grave et al.) spends its work on the common ones."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocabulary, embedding)
            self.rnn = nn.GRU(embedding, hidden, batch_first=True)
            self.out = nn.AdaptiveLogSoftmaxWithLoss(hidden, vocabulary, cutoffs=[1000, 4000], div_value=4.0)

        def hidden(self, x, state=None):
            return self.rnn(self.embed(x), state)

        def forward(self, x, state=None):
            """Log-probabilities of the next word at every position, and the recurrent state."""
            y, state = self.hidden(x, state)
            return self.out.log_prob(y.reshape(-1, y.shape[-1])).reshape(*y.shape[:2], -1), state

    return GRULanguageModel()


def server_app(student: Student, name: str):
    """An OpenAI-compatible app serving `student` as model `name`."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        body = await request.json()
        prompt = "\n".join(str(m.get("content") or "") for m in body.get("messages", []))
        seed = random.randrange(2**31)
        text, finish = await asyncio.to_thread(
            student.answer, prompt, int(body.get("max_tokens") or 300), float(body.get("temperature", 1.0)), seed
        )
        message = {"role": "assistant", "content": text}
        return JSONResponse({"object": "chat.completion", "model": name,
                             "choices": [{"index": 0, "message": message, "finish_reason": finish}]})  # fmt: skip

    async def completions(request):
        body = await request.json()
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not body.get("echo") or int(body.get("max_tokens") or 0) != 0 or not prompts:
            return JSONResponse({"error": {"message": "this server only scores text: echo, max_tokens 0"}}, 400)
        scored = await asyncio.to_thread(student.score, prompts)
        choices = [{"index": i, "text": t, "logprobs": s, "finish_reason": "length"}
                   for i, (t, s) in enumerate(zip(prompts, scored, strict=True))]  # fmt: skip
        return JSONResponse({"object": "text_completion", "model": name, "choices": choices})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"])])  # fmt: skip
