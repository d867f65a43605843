"""How a pushed policy's weights reach the generation servers (servers.weight_transport):
through a safetensors folder on storage the servers read (disk), or vLLM's NCCL engine (nccl).

A transport only moves and loads the tensors; pausing, the prefix cache, the version label
and resuming are `engines.server.ServerGenerator.update_weights`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Protocol
from urllib.parse import urlparse

import torch

from online_dpo.errors import ConfigError

log = logging.getLogger("online_dpo")

WEIGHTS_FILE = "model.safetensors"


class WeightTransport(Protocol):
    def push(self, servers: list, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Load `weights` ((name, tensor) pairs under the plain HF names) into every (paused) server."""
        ...


def separate_tensors(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every name with a tensor of its own: a tied copy (an lm_head that shares the embeddings)
    is cloned, since a safetensors file cannot hold shared storage, and vLLM's in-place reload
    must receive it too: a tied layer that gets no tensor keeps its old weights."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in weights:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.detach().contiguous().clone() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    return out


class DiskTransport:
    """Each version is written, as one safetensors file, to `<root>/<version>/` (written under a
    temporary name and renamed, so a server never reads half a file), then loaded by every
    server through vLLM's in-place `reload_weights`. The newest `keep` versions stay on disk.
    `root` must be readable at the same path by the servers (shared storage across nodes)."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def write(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final, tmp = self.root / version, self.root / f".{version}.tmp"
        for folder in (tmp, final):  # a killed write's leftover; a version pushed again after a roll-back
            if folder.exists() or folder.is_symlink():
                self.remove_pushed(folder)
        tmp.mkdir()
        save_file(separate_tensors(weights), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "version": version})
        os.replace(tmp, final)
        return final

    def push(self, servers: list, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        folder = self.write(weights, version)
        for server in servers:
            server.reload_from(str(folder.resolve()))
        self.prune(keep_also=folder)

    def prune(self, keep_also: Path) -> None:
        """Delete all but the newest `keep` pushed versions; anything else in the folder (servers.weights_dir
        may be shared with other files) is left alone."""
        versions = sorted((p for p in self.root.iterdir() if not p.name.startswith(".") and is_pushed_version(p)),
                          key=lambda p: p.stat().st_mtime)
        for old in versions[:-self.keep]:
            if old != keep_also:
                self.remove_pushed(old)

    def remove_pushed(self, folder: Path) -> None:
        """Delete a folder this transport wrote; refuse anything else with what to do."""
        if not is_pushed_version(folder):
            raise ConfigError(f"{folder} is in the way of a weight push and is not a folder of pushed weights (it "
                              f"holds more than {WEIGHTS_FILE}); move it, or set servers.weights_dir to a folder of "
                              f"its own")
        shutil.rmtree(folder)


def is_pushed_version(folder: Path) -> bool:
    """Whether `folder` is one DiskTransport wrote: a real folder holding at most its weights file."""
    return folder.is_dir() and not folder.is_symlink() and {p.name for p in folder.iterdir()} <= {WEIGHTS_FILE}


class NcclTransport:
    """vLLM's NCCL weight-transfer engine: the trainer joins one NCCL group per server (as rank
    0, the servers' workers after it) and broadcasts every tensor from its GPU. Needs CUDA on
    the trainer and servers started with `--weight-transfer-config '{"backend": "nccl"}'`.
    The groups are set up at the first push; server i rendezvous on `port + i`."""

    def __init__(self, port: int, timeout_s: float):
        if not torch.cuda.is_available():
            raise ConfigError(
                "servers.weight_transport=nccl broadcasts the weights from the trainer's GPU to the servers' GPUs "
                "through vLLM's NCCL weight-transfer engine, and this machine has no CUDA GPU; use "
                "servers.weight_transport=disk (a folder the servers can read, servers.weights_dir)")
        self.port = port
        self.timeout_s = timeout_s
        self.engines: dict[str, object] = {}
        self.source = None

    def push(self, servers: list, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        self.source = tensor_source(list(separate_tensors(weights).items()))
        for i, server in enumerate(servers):
            if server.url not in self.engines:
                self.engines[server.url] = self.connect(server, self.port + i)
            self.engines[server.url].source = self.source
            self.engines[server.url].send_weights()

    def connect(self, server, port: int):
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        workers = server.request("GET", "/get_world_size", params={"include_dp": True})["world_size"]
        info = NCCLTrainerInitInfo(master_address=reachable_address(server.url), master_port=port,
                                   world_size=1 + workers, rank=0)
        log.info("NCCL weight transfer to %s: %d workers, rendezvous on port %d", server.url, workers, port)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=ServerWeightSyncClient(server),
                                                            source=self.source)


class ServerWeightSyncClient:
    """vLLM's weight-sync control plane (its VLLMWeightSyncClient protocol: the requests of its
    HTTPVLLMWeightSyncClient) sent through an `engines.server.Server`, so each request carries the
    servers' API key, which vLLM's own client cannot send, and a failure names the server. NCCL's
    update payloads are plain JSON (only CUDA IPC handles would need encoding)."""

    def __init__(self, server):
        self.server = server

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.server.request("POST", "/init_weight_transfer_engine", json={"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.server.request("POST", "/shutdown_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self.server.request("POST", "/start_weight_update")

    def update_weights(self, update_info) -> None:
        self.server.request("POST", "/update_weights", json={"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.server.request("POST", "/finish_weight_update",
                            json={"weight_version": weight_version} if weight_version is not None else None)


def reachable_address(url: str) -> str:
    """This machine's address on the route to `url`'s host (what the server's workers dial)."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parsed.hostname, parsed.port or 80))  # UDP: no packet is sent
        return s.getsockname()[0]


def tensor_source(named: list[tuple[str, torch.Tensor]]):
    """vLLM's WeightSource over the pushed version's (name, tensor) pairs, on the GPU: what its
    NCCL engine reads (the metadata first, then the tensors in the same order)."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class TensorSource(WeightSource):
        def __init__(self):
            self.named = [(n, t.cuda()) for n, t in named]

        def metadata(self):
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.named]

        def __iter__(self):
            return iter(self.named)

    return TensorSource()


def build_transport(servers_cfg, default_root: Path) -> WeightTransport:
    """The transport servers.weight_transport names."""
    if servers_cfg.weight_transport == "nccl":
        return NcclTransport(servers_cfg.nccl_port, servers_cfg.timeout_s)
    return DiskTransport(servers_cfg.weights_dir or default_root)
