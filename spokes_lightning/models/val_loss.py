"""Held-out validation loss of a local causal LM.

``validation_loss`` is the token-weighted mean next-token cross-entropy (nats/token) over
held-out documents: every document is tokenized on its own (tokenizer defaults), cut
into consecutive windows of at most ``max_length`` tokens, and each window predicts its
tokens 2..L from the preceding ones (windows do not overlap, so each token is predicted
at most once and a window's first token is never a target). The summed loss is divided
by the number of predicted tokens over all documents, so long documents weigh more.
"""
from __future__ import annotations

from pathlib import Path

from spokes_lightning.utils.errors import UserError


def _windows(token_ids: list[int], max_length: int) -> list[list[int]]:
    return [token_ids[i:i + max_length] for i in range(0, len(token_ids), max_length)
            if len(token_ids[i:i + max_length]) >= 2]


def summed_window_loss(model, windows: list[list[int]], pad_id: int, device: str) -> tuple[float, int]:
    """Sum of token cross-entropies over a batch of windows, and how many tokens were scored."""
    import torch
    import torch.nn.functional as F

    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        ids[row, :len(window)] = torch.tensor(window)
        mask[row, :len(window)] = 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return float(loss), int((targets != -100).sum())


def validation_loss(model_dir: str | Path, texts, max_length: int = 512, batch_size: int = 8,
                    device: str = "cpu") -> float:
    """Token-weighted mean cross-entropy (nats per predicted token) of ``texts``."""
    import torch
    from transformers import AutoModelForCausalLM

    from spokes_lightning.models.tokenizer import load_tokenizer
    from spokes_lightning.utils.progress import progress

    if max_length < 2:
        raise UserError(f"max_length must be at least 2, got {max_length}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model directory {model_dir} has no config.json")
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = [w for text in texts for w in _windows(tokenizer(text)["input_ids"], max_length)]
    if not windows:
        raise UserError("validation_loss: no document has 2 or more tokens")
    windows.sort(key=len)  # similar lengths per batch -> less padding
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in progress(range(0, len(windows), batch_size), "validation loss"):
            loss, n = summed_window_loss(model, windows[start:start + batch_size], pad_id, device)
            total, count = total + loss, count + n
    return total / count
