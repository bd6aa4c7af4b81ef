"""Trained heads in the runtime: one UNet pass per noise step (the head graph holds the UNet layers it
reads and the head). A mixin of Engine, which supplies the manifest, runners, images and workers."""

from __future__ import annotations

import numpy as np

from diffscore.engine.backends.base import Runner
from diffscore.engine.backends.choice import make_runner
from diffscore.engine.images import IMAGE_WINDOW, count_images, image_windows
from diffscore.engine.progress import progress_bar
from diffscore.engine.results import Classification
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
        runner = self.head_runner(name)
        per_call = max(1, (batch_size or self.default_batch_size()) // len(steps))  # images per call
        chunks = []
        with progress_bar(f"head {name}", count_images(images), progress) as advance:
            for window_images in image_windows(images, max(per_call * self.workers, IMAGE_WINDOW)):
                x0 = self.encode_images(window_images)
                size = min(per_call, -(-len(x0) // self.workers))  # a few images still keep every worker busy
                logits = np.empty((len(x0), len(spec.labels)), dtype=np.float32)

                def run(lo: int) -> int:
                    x = x0[lo : lo + size]
                    xt = np.stack([add_noise(xi, noise, self.alphas_cumprod, steps) for xi in x])  # (n, steps, C, H, W)
                    logits[lo : lo + len(x)] = runner.infer({"sample": xt})["logits"]
                    return len(x)

                starts = range(0, len(x0), size)
                for n in self._pool.map(run, starts) if self._pool else map(run, starts):
                    advance(n)
                chunks.append(logits)
        if not chunks:
            raise EngineError("no images given")
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

    def head_runner(self, head: str | None = None) -> Runner:
        """The runner of a head's graph (x_t -> logits)."""
        return self.graph_runner(self.manifest.heads[self.head_name(head)].graph)

    def graph_runner(self, graph: str) -> Runner:
        """The runner of a graph beside the UNet (a head, DiffDis, ITC), opened on first use. They are fp32 ONNX
        (whatever the UNet precision), on ONNX Runtime; under the native TensorRT backend on its CUDA provider
        when there is one."""
        if graph not in self.runners:
            backend = self.backend
            if backend == "tensorrt":
                from diffscore.engine.backends.onnxruntime import available_providers

                backend = "ort-cuda" if "CUDAExecutionProvider" in available_providers() else "ort-cpu"
            self.runners[graph] = make_runner(self.engine_dir, self.manifest, graph, backend, self._device, self._threads,
                                              workers=self.workers)
        return self.runners[graph]

    def _classify_head(self, images, options, batch_size, progress) -> list[Classification]:
        """Classifications by the resolved HeadOptions' head: ranking = softmax probability."""
        spec = self.manifest.heads[options.head]
        classes = spec.labels
        logits = self.head_logits(images, options.head, batch_size=batch_size, progress=progress).astype(np.float64)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        results = []
        for row, logit in zip(p, logits):
            order = np.argsort(-row, kind="stable")
            lead = float(logit[order[0]] - logit[order[1]]) if len(order) > 1 else float("inf")  # log(p1 / p2)
            results.append(Classification(label=classes[order[0]], ranking=[(classes[c], float(row[c])) for c in order],
                                          passes=len(spec.steps) * spec.passes_per_step, options=options,
                                          confidence=lead))
        return results
