"""Judges: the causal language models that score samples. One family, one builder.

A judge is the project's causal DiT (``ARJudge``, the AR stage's export) or a Hugging Face causal LM
from a local folder (``HFJudge``). Each scores token ids two ways, one per kind of evaluation:

* ``score_ids(ids)``, also ``judge(ids)`` (a judge is a ``quality.JudgeFn``): samples whose ids are
  already the judge's (synthetic data), scored as they are; the log-probability of every token it
  scores, float64 [B, T], batched inside, in float32 arithmetic. ``quality.gen_ppl`` reads it.
* ``run(x)``: one padded batch of the judge's ids for the text protocol (trainer/evaluation/text.py:
  retokenised gen-PPL, MAUVE's features): each token's log-probability given the ones before it,
  float64 [B, T] (NaN where unscored), in float64 arithmetic, and the hidden state that has read
  tokens 0..i, [B, T, d]. Needs the judge's ``tokenizer`` (``max_tokens``: the longest it reads).

The two routes keep the arithmetic each had before they were one family, so an evaluation writes the
numbers it wrote then. ``build_judge`` reads ``eval.judge`` (or ``eval.mauve_features``) for both.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import RunConfig
from trainer.data.tokenizers import Tokenizer, load_tokenizer
from trainer.evaluation.quality import JudgeError


class Judge:
    """A causal LM that scores token ids (see the module docstring for the two routes)."""

    name: str
    vocab_size: int
    tokenizer: Tokenizer | None  # the text route's; None for a judge of ids only
    max_tokens: int | None  # the longest sequence ``run`` reads (None: no limit known)

    def score_ids(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.score_ids(ids)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise JudgeError(f"judge {self.name}: ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}] (samples from another tokenizer?)")


@contextmanager
def _evaluating(model: nn.Module):
    """The model in eval mode (no dropout while judging), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class ARJudge(Judge):
    """The project's causal DiT (``DiT(cfg, causal=True)``): its input is BOS = MASK id = V followed by
    the tokens, and the logits at position i score token i, so every token is scored. The MASK column
    is dropped: the judge's law is over the V real tokens. ``score_ids`` feeds BOS and the first L - 1
    tokens (L positions: a sample as long as the model's context fits); ``run`` feeds BOS and all T
    tokens, so the hidden state after the last one exists (``max_tokens`` = context - 1)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, batch_size: int = 64,
                 name: str = "ar"):
        if not getattr(model, "causal", False):
            raise JudgeError("the AR judge must be the causal model, DiT(cfg, causal=True): a bidirectional "
                             "model would see the tokens it scores")
        self.model = model
        self.vocab_size: int = model.cfg.vocab_size
        self.batch_size = batch_size
        self.name = name
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.vocab_size > self.vocab_size:
            raise JudgeError(f"AR judge: its vocabulary ({self.vocab_size}) is smaller than the tokenizer's "
                             f"({tokenizer.vocab_size}, {tokenizer.name}): trained on other data?")
        context = getattr(model.cfg, "max_seq_len", None)
        self.max_tokens = context - 1 if context else None  # + BOS

    @torch.no_grad()
    def score_ids(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        device = next(self.model.parameters()).device
        out = []
        with _evaluating(self.model):
            for chunk in ids.split(self.batch_size):
                x = chunk.to(device, torch.long)
                bos = torch.full_like(x[:, :1], self.vocab_size)
                logits = self.model(torch.cat([bos, x[:, :-1]], dim=1))[..., :self.vocab_size]
                out.append(_token_log_probs(logits, x))
        return torch.cat(out)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        x = x.to(device, torch.long)
        bos = torch.full_like(x[:, :1], self.vocab_size)
        seen: list[torch.Tensor] = []
        hook = self.model.output_layer.norm_final.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with _evaluating(self.model):
                logits = self.model(torch.cat([bos, x], dim=1))[..., :self.vocab_size]
        finally:
            hook.remove()
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
        return logp.cpu(), seen[0][:, 1:].float().cpu()


class HFJudge(Judge):
    """A transformers causal LM saved in ``local_dir`` (safetensors; never downloaded), e.g. GPT-2
    large saved with ``save_pretrained``; with ``with_tokenizer`` also its tokenizer from the same
    folder (the text route). No BOS by default: the first token is unscored (MDLM's convention);
    ``score_ids`` prepends ``bos_id`` when given and then scores all L tokens. Ids must be in the
    judge's vocabulary. ``dtype``: cast after loading (None: as saved)."""

    def __init__(self, local_dir: str | Path, device: str | torch.device = "cpu", batch_size: int = 16,
                 bos_id: int | None = None, dtype: torch.dtype | None = torch.float32,
                 with_tokenizer: bool = False, key: str = "eval.judge"):
        from transformers import AutoModelForCausalLM  # heavy: only judges pay for it

        path = Path(local_dir)
        if not path.is_dir():
            raise JudgeError(f"judge model directory not found: {path} ({key})")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise JudgeError(f"{path}: cannot load a causal LM with safetensors weights: {e}") from None
        # Cast after loading: the dtype keyword of from_pretrained changed name across versions.
        self.model = (model.to(device) if dtype is None else model.to(device=device, dtype=dtype)).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.bos_id = bos_id
        self.vocab_size: int = model.config.vocab_size
        self.max_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self.max_tokens = int(self.max_len or 1024)
        self.tokenizer = load_tokenizer(str(path)) if with_tokenizer else None
        self.name = path.resolve().name

    @torch.no_grad()
    def score_ids(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_ids(ids)
        length = ids.shape[1] + (self.bos_id is not None)
        if self.max_len is not None and length > self.max_len:
            raise JudgeError(f"judge {self.name}: {length} positions exceed its context of {self.max_len}")
        out = []
        for chunk in ids.split(self.batch_size):
            x = chunk.to(self.device, torch.long)
            if self.bos_id is not None:
                x = torch.cat([torch.full_like(x[:, :1], self.bos_id), x], dim=1)
            logits = self.model(x).logits[:, :-1].float()
            out.append(_token_log_probs(logits, x[:, 1:]))
        return torch.cat(out)

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        x = x.to(device, torch.long)
        out = self.model(x, output_hidden_states=True)
        logp = torch.full(x.shape, float("nan"), dtype=torch.float64)
        scored = torch.log_softmax(out.logits[:, :-1].double(), dim=-1).gather(-1, x[:, 1:].unsqueeze(-1))
        logp[:, 1:] = scored.squeeze(-1).cpu()
        return logp, out.hidden_states[-1].float().cpu()


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, float64 on the CPU. cross_entropy does not keep a
    second [B, T, V] tensor of log-probs (3 GB for GPT-2's vocabulary at batch 16 x 1024)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return -nll.view(targets.shape).double().cpu()


def build_judge(cfg: RunConfig, device: torch.device | str, tokenizer: Tokenizer | None = None,
                key: str = "judge") -> Judge | None:
    """The judge ``eval.<key>`` names: "" (none), "ar" (``eval.judge`` only: the AR stage's export at
    eval.ar_path) or a local Hugging Face directory holding a causal LM. With ``tokenizer`` (the run's)
    the judge is built for the text route: the AR judge reads with the run's tokenizer, a Hugging Face
    judge with its own, loaded as saved; without, for ids (float32, ``eval.batch_size`` per forward).
    ``key="mauve_features"``: MAUVE's feature model (a Hugging Face directory)."""
    spec = getattr(cfg.eval, key)
    if not spec:
        return None
    if spec == "ar" and key == "judge":
        from trainer.runtime.checkpoint import load_model

        path = Path(cfg.eval.ar_path)
        if not (path / "export.json").is_file():
            raise JudgeError(f"eval.ar_path: no AR export at {path} (export.json missing): run the AR stage "
                             f"(python -m trainer.jobs.pretrain --ar) first")
        model, _ = load_model(path, "ema", causal=True)
        return ARJudge(model.to(device), tokenizer, batch_size=cfg.eval.batch_size)
    text = tokenizer is not None  # the text route: the judge's own tokenizer, weights as saved
    return HFJudge(spec, device, batch_size=cfg.eval.batch_size, dtype=None if text else torch.float32,
                   with_tokenizer=text, key=f"eval.{key}")
