"""Trained heads in the runtime: one UNet pass per noise step (the head graph holds the UNet layers it
reads and the head). `HeadScoring` is a mixin of Engine, which supplies the manifest, runners, images and
workers; `classify_head` is method "head"'s scorer (engine/scorers/)."""

from __future__ import annotations

import numpy as np

from diffscore.engine.graph_contract import LOGITS, SAMPLE
from diffscore.engine.images import IMAGE_WINDOW
from diffscore.engine.results import Classification, ranked
from diffscore.errors import EngineError
from diffscore.kernels import add_noise, shared_noise



class HeadScoring:
    def head_logits(self, images, head: str | None = None, *, batch_size: int | None = None,
                    progress: bool = False) -> np.ndarray:
        """(N, classes) logits of a trained head, classes in `manifest.heads[head].labels` order.

        Each image is noised at the head's steps with its fixed ε (seeded, shared by all images); the head
        graph holds the UNet layers it reads (on its prompt, empty unless set) and the head: one UNet
        pass per step.
        """
        name = self.head_name(head)
        spec = self.manifest.heads[name]
        steps = np.asarray(spec.steps, dtype=np.int64)
        noise = shared_noise(spec.seed, len(steps), tuple(self.manifest.sample_shape))
        runner = self.runner(name)
        per_call = max(1, (batch_size or self.default_batch_size()) // len(steps))  # images per call
        chunks = []
        for x0 in self.encoded_windows(images, f"head {name}", progress, max(per_call * self.workers, IMAGE_WINDOW)):
            size = min(per_call, -(-len(x0) // self.workers))  # a few images still keep every worker busy
            logits = np.empty((len(x0), len(spec.labels)), dtype=np.float32)

            def run(lo: int) -> None:
                x = x0[lo : lo + size]
                xt = np.stack([add_noise(xi, noise, self.alphas_cumprod, steps) for xi in x])  # (n, steps, C, H, W)
                logits[lo : lo + len(x)] = runner.infer({SAMPLE: xt})[LOGITS]

            starts = range(0, len(x0), size)
            list(self._pool.map(run, starts) if self._pool else map(run, starts))
            chunks.append(logits)
        return np.concatenate(chunks)

    def head_name(self, head: str | None = None) -> str:
        heads = self.manifest.heads
        if not heads:
            raise EngineError(f"{self.engine_dir} has no trained head; train one with `diffscore train-head` and "
                              "export it with `diffscore export MODEL OUT --head-dir HEAD_DIR`")
        if head is None:
            if len(heads) > 1:
                raise EngineError(f"{self.engine_dir} has several heads ({', '.join(heads)}); choose one (--head NAME)")
            return next(iter(heads))
        if head not in heads:
            raise EngineError(f"{self.engine_dir} has no head {head!r}; it has {', '.join(heads)}")
        return head


def classify_head(engine, images, options, batch_size: int | None, progress: bool) -> list[Classification]:
    """method "head" (resolved HeadOptions): ranking = the head's softmax probability, confidence = the winner's
    logit lead over the runner-up, log(p1 / p2)."""
    spec = engine.manifest.heads[options.head]
    classes = spec.labels
    logits = engine.head_logits(images, options.head, batch_size=batch_size, progress=progress).astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    passes = len(spec.steps) * spec.passes_per_step
    top2 = np.sort(logits, axis=1)[:, ::-1][:, :2]
    lead = top2[:, 0] - top2[:, 1] if logits.shape[1] > 1 else np.full(len(logits), np.inf)
    return [ranked(classes, row, passes, options, float(d)) for row, d in zip(p, lead)]
