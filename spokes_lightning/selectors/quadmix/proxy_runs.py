"""QuaDMix proxy experiments (paper section 3.2): a small LM trained on each sampled dataset.

Each proxy is the toolkit's own small LLaMA (:func:`~spokes_lightning.models.pretrain.pretrain_llama_config`
+ :func:`~spokes_lightning.models.llama.build_llama`, the same seed so every proxy starts from the
same weights), trained with the toolkit's optimiser (:func:`~spokes_lightning.models.llama.adamw`:
AdamW, betas 0.9/0.95, constant learning rate) and loss (:func:`~spokes_lightning.models.llama.causal_lm_loss`)
on the sampled documents packed like the proxy's (:func:`~spokes_lightning.models.proxy_training.pack_blocks`:
each copy truncated to ``seq_length - 1`` tokens + EOS, cut into blocks), for the SAME number of
steps (only the data differs). A plain loop rather than a Lightning ``Trainer``: a proxy is a few
seconds of work and thousands of them run in one search. Target: the token-weighted validation
loss on the target texts, windows as :mod:`~spokes_lightning.models.val_loss` cuts them, on
at most ``val_tokens`` tokens (whole windows of the texts in a seeded order; the same for every proxy).

Every finished run is a JSON file ``<cache_dir>/<key>.json`` whose key hashes everything the loss
depends on (proxy settings, the sampled rows and copies, the pool texts, the target texts, the
vocabulary): a killed search resumes, and a changed setting never reuses a stale loss.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from spokes_lightning.utils.atomic import write_json_atomic
from spokes_lightning.utils.errors import UserError
from spokes_lightning.utils.settings_hash import settings_hash

PROXY_FORMAT = 1


@dataclass(frozen=True)
class ProxySettings:
    n_layers: int = 2
    hidden: int = 64
    heads: int = 4
    seq_length: int = 128
    steps: int = 40
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.1
    val_tokens: int = 16384  # target tokens scored (a seeded subset of the target texts); 0 = all
    seed: int = 0

    def validate(self) -> None:
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise UserError(f"quadmix: proxy_hidden ({self.hidden}) / proxy_heads ({self.heads}) must be an even integer")


def _sha(obj) -> str:
    return settings_hash(obj, length=None)


def _texts_hash(texts) -> str:
    from spokes_lightning.models.tokenizer import corpus_hash

    return corpus_hash(texts)


class ProxyRunner:
    """Trains (or reads back) one proxy per sampled dataset; ``runs`` counts the trainings done here."""

    def __init__(self, texts: list[str], validation_texts: list[str], tokenizer, cache_dir: str | Path,
                 settings: ProxySettings, device: str | None = None):
        settings.validate()
        if not validation_texts:
            raise UserError("quadmix: the proxy search needs validation (target) texts")
        if tokenizer.eos_token_id is None:
            raise UserError("quadmix: the tokenizer has no EOS token")
        self.texts, self.validation, self.tokenizer, self.settings = texts, validation_texts, tokenizer, settings
        self.cache_dir = Path(cache_dir)
        self.device = device
        self.runs = 0
        self._identity = None
        self._windows = None

    @property
    def identity(self) -> dict:
        if self._identity is None:
            self._identity = {"format": PROXY_FORMAT, "settings": asdict(self.settings),
                              "pool": _texts_hash(self.texts), "target": _texts_hash(self.validation),
                              "vocab": len(self.tokenizer), "eos": int(self.tokenizer.eos_token_id)}
        return self._identity

    def key(self, indices, copies) -> str:
        data = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()
                              + b"|" + np.asarray(copies, dtype=np.int64).tobytes()).hexdigest()
        return _sha({**self.identity, "data": data})[:24]

    def cached(self, indices, copies) -> dict | None:
        try:
            record = json.loads((self.cache_dir / f"{self.key(indices, copies)}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and math.isfinite(record.get("loss", math.nan)) else None

    def loss(self, indices, copies, theta=None) -> float:
        """The validation loss of a proxy trained on rows ``indices`` with ``copies`` (cached)."""
        record = self.cached(indices, copies)
        if record is not None:
            return float(record["loss"])
        start = time.perf_counter()
        value = self.train(indices, copies)
        self.runs += 1
        write_json_atomic(self.cache_dir / f"{self.key(indices, copies)}.json", {
            "loss": value, "theta": None if theta is None else [float(t) for t in np.asarray(theta).reshape(-1)],
            "n_documents": int(len(indices)), "n_copies": int(np.sum(copies)),
            "seconds": round(time.perf_counter() - start, 3), **self.identity})
        return value

    def train(self, indices, copies) -> float:
        import torch

        from spokes_lightning.models.val_loss import summed_window_loss
        from spokes_lightning.models.llama import adamw, build_llama, causal_lm_loss
        from spokes_lightning.models.pretrain import pretrain_llama_config
        from spokes_lightning.models.proxy_training import pack_blocks

        s = self.settings
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rng = np.random.default_rng([s.seed, 0x51])
        rows = np.repeat(np.asarray(indices, dtype=np.int64), np.asarray(copies, dtype=np.int64))
        rows = rows[rng.permutation(len(rows))]
        blocks = pack_blocks([self.texts[r] for r in rows], self.tokenizer, s.seq_length)
        config = pretrain_llama_config(len(self.tokenizer), seq_length=s.seq_length, n_layers=s.n_layers,
                                       hidden=s.hidden, heads=s.heads)
        model = build_llama(config, s.seed).to(device).train()
        optimizer = adamw(model, s.lr, s.weight_decay)
        generator = torch.Generator().manual_seed(s.seed)
        order = torch.randperm(len(blocks), generator=generator)
        at = 0
        for _ in range(s.steps):  # a fixed number of steps; the data cycles (reshuffled) when short
            take = []
            while len(take) < s.batch_size:
                if at == len(order):
                    order, at = torch.randperm(len(blocks), generator=generator), 0
                take.append(int(order[at]))
                at += 1
            loss = causal_lm_loss(model, (blocks[take].to(device),))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        model.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        windows = self.validation_windows()
        total, count = 0.0, 0
        with torch.inference_mode():
            for i in range(0, len(windows), 16):
                part, n = summed_window_loss(model, windows[i:i + 16], pad, device)
                total, count = total + part, count + n
        return total / count

    def validation_windows(self) -> list[list[int]]:
        """Each target text tokenised alone, cut into windows of at most seq_length (>= 2 tokens)."""
        if self._windows is None:
            width, budget = self.settings.seq_length, self.settings.val_tokens
            order = np.random.default_rng([self.settings.seed, 0x7A1]).permutation(len(self.validation))
            windows, tokens = [], 0
            for t in order:  # texts in a seeded order until val_tokens tokens (whole windows)
                ids = self.tokenizer(self.validation[t])["input_ids"]
                for i in range(0, len(ids), width):
                    if len(ids[i:i + width]) >= 2 and not (budget and tokens >= budget):
                        windows.append(ids[i:i + width])
                        tokens += len(windows[-1])
                if budget and tokens >= budget:
                    break
            if not windows:
                raise UserError("quadmix: no validation text has 2 or more tokens")
            self._windows = sorted(windows, key=len)
        return self._windows
