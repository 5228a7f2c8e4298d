"""A stand-in for torch.compile that records what the compiled restore pass gets."""

from __future__ import annotations

import torch


def recording_compile(batches: list, functions: list | None = None, backend: str | None = None):
    """Stands in for `torch.compile(fn, mode, dynamic)`: the pass runs as it is (or as dynamo's graphs, run by
    `backend`), each call's batch size appended to `batches` and each function compiled to `functions`."""
    compile_ = torch.compile

    def stand_in(fn, mode, dynamic):
        if functions is not None:
            functions.append(fn)
        graph = fn if backend is None else compile_(fn, backend=backend, dynamic=dynamic)

        def compiled(images, *args):
            batches.append(images.shape[0])
            return graph(images, *args)

        return compiled

    return stand_in
