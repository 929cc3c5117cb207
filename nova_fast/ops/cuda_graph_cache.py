"""CUDA graphs of the denoising loop: one capture per key, replayed; a small LRU of captures.

A ``CapturedLoop`` copies its inputs into static buffers, runs ``body(*buffers)`` once on a side
stream (warm-up: kernel compilation, cuBLAS workspaces), captures a second run into a CUDA graph,
and on ``replay`` copies fresh inputs into the buffers and replays. The graph reads the tensors
``body`` touched by address, so the capture keeps ``keep_alive`` (the weights it read) alive for as
long as it lives, and keys must never contain a recyclable identity such as ``id()`` of an object
that can die: the caller keys on a serial number that is never reused.

``body`` must not synchronise with the host (no ``.item()``, ``.tolist()``, ``.cpu()``, no tensors
built from Python data or on the CPU): tests/test_denoise_capture.py runs the loop's body eagerly
under patches that fail on such calls.
"""
from __future__ import annotations

import torch

GRAPH_CACHE_SIZE = 8


def _clone(value):
    if isinstance(value, (list, tuple)):
        return [_clone(v) for v in value]
    return None if value is None else value.clone()


def _copy_into(dst, src) -> None:
    if isinstance(dst, list):
        for d, s in zip(dst, src):
            _copy_into(d, s)
    elif dst is not None:
        dst.copy_(src)


class CapturedLoop:
    """Static input buffers, one captured graph of ``body``, and its static output."""

    def __init__(self, body, inputs: tuple, keep_alive=None):
        # the graph also reads what body's closure holds (e.g. the step kernel's workspace) by address
        self.body, self.keep_alive = body, keep_alive
        self.inputs = [_clone(v) for v in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            body(*self.inputs)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.out = body(*self.inputs)

    def replay(self, inputs: tuple) -> torch.Tensor:
        _copy_into(self.inputs, list(inputs))
        self.graph.replay()
        return self.out.clone()


_graphs: dict = {}


def run_captured(key, body, inputs: tuple, keep_alive=None) -> torch.Tensor:
    """Replay the capture stored under ``key`` with ``inputs`` (capturing ``body`` on first use);
    the least recently used capture is dropped beyond GRAPH_CACHE_SIZE."""
    loop = _graphs.pop(key, None)
    if loop is None:
        loop = CapturedLoop(body, inputs, keep_alive)
        while len(_graphs) >= GRAPH_CACHE_SIZE:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = loop  # most recently used last
    return loop.replay(inputs)


def cached_keys() -> list:
    return list(_graphs)


def clear() -> None:
    _graphs.clear()
