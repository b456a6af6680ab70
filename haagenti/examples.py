"""A real model family, made by training: no downloads.

A small transformer classifies scikit-learn's 8x8 digits (each image is a sequence of 8 rows
of 8 pixels). From the trained base we make the variants real catalogs hold: full fine-tunes
at two learning rates, a partial fine-tune with frozen layers, a LoRA-style low-rank merge,
an fp16 re-export of the bf16 base, and one unrelated model trained from another seed.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.o_proj(a)
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, ffn: int = 1024):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos_embed = nn.Parameter(torch.zeros(8, d))
        self.layers = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos_embed
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, params=None) -> float:
    """Adam on minibatches; returns final training accuracy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else [p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _round_trip(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Weights as a checkpoint in `dtype` would hold them, so fine-tunes start from what was published."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).float())
    return m


def _save(model: nn.Module, path: str, dtype: torch.dtype, note: str) -> None:
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"haagenti_example": note})


@dataclass(frozen=True)
class FamilyMember:
    model_id: str
    file: str
    family: str | None
    note: str


MEMBERS = ("digits-base", "digits-ft-lr1e-4", "digits-ft-lr1e-3", "digits-ft-partial", "digits-lora-merged", "digits-base-fp16", "unrelated")
_RECORD = "family.json"


def make_family(
    out_dir: str, d: int = 256, layers: int = 4, seed: int = 0, epochs: int = 3, progress: Callable[[str], None] | None = None
) -> list[FamilyMember]:
    """Train the example family into `out_dir`; returns its members (deterministic for a seed).
    `progress(name)` is called as each member is written; `family.json` records the settings
    so `cached_family` can reuse the files."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, _RECORD))  # stale until this run completes
    x, y = digits()
    members: list[FamilyMember] = []

    def emit(model: nn.Module, name: str, dtype: torch.dtype, note: str, family: str | None = "digits") -> None:
        path = os.path.join(out_dir, f"{name}.safetensors")
        _save(model, path, dtype, note)
        members.append(FamilyMember(name, path, family, note))
        if progress:
            progress(name)

    base = DigitsTransformer(d, layers)
    acc = train(base, x, y, epochs, 1e-3, seed)
    emit(base, "digits-base", torch.bfloat16, f"base, train acc {acc:.3f}")
    published = _round_trip(base, torch.bfloat16)

    # Fine-tunes see a shifted task: digits with pixel noise, as a domain-adapted release would.
    xn = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7))).clamp(0, 1)
    for name, lr in (("digits-ft-lr1e-4", 1e-4), ("digits-ft-lr1e-3", 1e-3)):
        m = copy.deepcopy(published)
        acc = train(m, xn, y, 1, lr, seed + 1)
        emit(m, name, torch.bfloat16, f"full fine-tune lr={lr}, acc {acc:.3f}")

    partial = copy.deepcopy(published)
    frozen = [partial.embed, partial.layers[: layers // 2]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    partial.pos_embed.requires_grad_(False)
    acc = train(partial, xn, y, 1, 5e-4, seed + 2)
    emit(partial, "digits-ft-partial", torch.bfloat16, f"fine-tune of the upper half, lower layers frozen, acc {acc:.3f}")

    emit(_lora_merge(published, xn, y, rank=8, seed=seed + 3), "digits-lora-merged", torch.bfloat16, "LoRA rank 8 on q/v, merged")
    emit(published, "digits-base-fp16", torch.float16, "fp16 re-export of the bf16 base")

    torch.manual_seed(seed + 1000)
    other = DigitsTransformer(d, layers)
    acc = train(other, x, y, epochs, 1e-3, seed + 1000)
    emit(other, "unrelated", torch.bfloat16, f"same architecture, another seed, acc {acc:.3f}", family=None)
    record = {"settings": _settings(d, layers, seed, epochs), "members": [asdict(m) | {"file": os.path.basename(m.file), "size": os.path.getsize(m.file)} for m in members]}
    with open(os.path.join(out_dir, _RECORD), "w") as f:
        json.dump(record, f, indent=1)
    return members


def cached_family(out_dir: str, d: int = 256, layers: int = 4, seed: int = 0, epochs: int = 3) -> list[FamilyMember] | None:
    """The family already trained into `out_dir` with these settings by this code, or None.
    Training takes minutes; `make demo` and `haagenti examples make-family` reuse it."""
    try:
        with open(os.path.join(out_dir, _RECORD)) as f:
            record = json.load(f)
        members = [FamilyMember(m["model_id"], os.path.join(out_dir, m["file"]), m["family"], m["note"]) for m in record["members"]]
        sizes = [m["size"] for m in record["members"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("settings") != _settings(d, layers, seed, epochs):
        return None
    if not all(os.path.isfile(m.file) and os.path.getsize(m.file) == n for m, n in zip(members, sizes)):
        return None
    return members


def family_cache() -> str:
    """Where trained families are kept for any folder to reuse: $HAAGENTI_CACHE/families, else
    ~/.cache/haagenti/families (or under $XDG_CACHE_HOME)."""
    root = os.environ.get("HAAGENTI_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "haagenti")
    return os.path.join(root, "families")


def obtain_family(out_dir: str, d: int = 256, layers: int = 4, seed: int = 0, epochs: int = 3,
                  progress: Callable[[str], None] | None = None, cache: str | None = None) -> tuple[list[FamilyMember], str]:
    """The example family in `out_dir`, trained at most once per machine: kept if `out_dir`
    holds it ("kept"), else copied from `cache` (default `family_cache()`), where families are
    keyed by their settings, this code and torch's version ("copied"), else trained there first
    ("trained"; concurrent callers wait for one training). Returns the members and which."""
    import fcntl
    import shutil

    members = cached_family(out_dir, d, layers, seed, epochs)
    if members is not None:
        return members, "kept"
    key = hashlib.sha256(json.dumps(_settings(d, layers, seed, epochs), sort_keys=True).encode()).hexdigest()[:16]
    home = os.path.join(cache or family_cache(), key)
    os.makedirs(os.path.dirname(home), exist_ok=True)
    how = "copied"
    with open(home + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached_family(home, d, layers, seed, epochs) is None:
            staging = home + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            make_family(staging, d, layers, seed, epochs, progress)
            shutil.rmtree(home, ignore_errors=True)
            os.replace(staging, home)
            how = "trained"
    shutil.copytree(home, out_dir, dirs_exist_ok=True)
    members = cached_family(out_dir, d, layers, seed, epochs)
    if members is None:
        raise OSError(f"{out_dir}: the family copied from {home} does not read back")
    return members, how


def _settings(d: int, layers: int, seed: int, epochs: int) -> dict:
    """What decides the trained bytes: the settings, this module's code and torch's version."""
    with open(__file__, "rb") as f:
        code = hashlib.sha256(f.read()).hexdigest()
    return {"d": d, "layers": layers, "seed": seed, "epochs": epochs, "code": code, "torch": torch.__version__}


def _lora_merge(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, seed: int) -> nn.Module:
    """Train low-rank adapters B@A on q/v projections with the base frozen, then fold them in."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for block in m.layers:
        for proj in (block.q_proj, block.v_proj):
            out_f, in_f = proj.weight.shape
            a = nn.Parameter(torch.randn(rank, in_f, generator=g) / in_f**0.5)
            b = nn.Parameter(torch.zeros(out_f, rank))
            adapters.append((proj, a, b))
            proj.register_forward_hook(lambda mod, inp, out, a=a, b=b: out + inp[0] @ a.T @ b.T)
    train(m, x, y, 1, 1e-3, seed, params=[t for _, a, b in adapters for t in (a, b)])
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for (proj, a, b), target in zip(adapters, [p for blk in merged.layers for p in (blk.q_proj, blk.v_proj)]):
            target.weight += b @ a
    return merged


def write_catalog(members: list[FamilyMember], out_dir: str) -> str:
    """A catalog YAML listing the members (what `haagenti dedup` reads)."""
    import yaml

    path = os.path.join(out_dir, "catalog.yaml")
    doc = {"models": [{"id": m.model_id, "family": m.family, "files": [os.path.abspath(m.file)]} for m in members]}
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path
