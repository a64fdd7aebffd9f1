"""Text evaluation in the field's protocol (MDLM, SDTT, Duo): what a researcher compares against.

* **Generative perplexity, retokenised.** Samples are decoded to text with the model's tokenizer and
  re-encoded with the judge's; each retokenised sample is scored up to and including its first EOS,
  nothing after it. A wrapped row's leading ``[BOS]`` (GPT-2's ``<|endoftext|>``) is kept as unscored
  context: the judge read it first in training, as the samples' rows begin with it. gen-PPL =
  exp(sum of NLL / number of scored tokens) over all samples. A judge without a BOS (a Hugging Face
  GPT-2) cannot score a sample's first token, as in MDLM; the project's own AR judge can (its input
  starts with its own BOS), so it scores every token but a leading [BOS].
* **Entropy beside it**: the mean per-sample entropy of the sampled token ids
  (``quality.sequence_entropies``, per sample so models pair up), which exposes the low-temperature
  collapse that lowers gen-PPL. Held-out text gives the reference row: its entropy is the target the
  report reads every model's gen-PPL at (its temperature sweep's frontier).
* **MAUVE** (Pillutla et al. 2021, ``mauve-text``) of prefix-conditioned samples against held-out
  text: the first ``eval.prefix_tokens`` tokens of held-out rows are clamped, the model fills in the
  rest, and MAUVE compares the continuations' text with the held-out continuations' text. Features
  are the judge's final hidden state at the last token of each retokenised continuation (MAUVE's
  own recipe, with our judge instead of GPT-2 large).
* **The likelihood bound** (MDLM's ELBO, nats/token, and its perplexity bound) on held-out rows with
  fixed noise, so two evaluations of the same model agree exactly.

Sampling is the sweep's (float64 Gumbel, trainer/method/sampling.py); this module only measures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.config import RunConfig, SamplerConfig
from trainer.data.tokenizers import Tokenizer, load_tokenizer
from trainer.evaluation.quality import JudgeError, sequence_entropies
from trainer.method import diffusion, sampling


# --------------------------------------------------------------------------------------------------
# Judges that read text
# --------------------------------------------------------------------------------------------------
class TextJudge:
    """A causal LM with its tokenizer. ``run(x)`` gives, for Long [B, T]: the log-prob of every
    token given the ones before it, float64 [B, T] (NaN where unscored), and the hidden state that
    has read tokens 0..i, [B, T, d]."""

    tokenizer: Tokenizer
    max_tokens: int  # the longest sequence it can read
    name: str

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class OwnARTextJudge(TextJudge):
    """The project's causal DiT (the AR stage's export) and the run's tokenizer. The input is BOS
    (= MASK id = V) followed by the tokens, so every token is scored."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, name: str = "ar"):
        if not getattr(model, "causal", False):
            raise JudgeError("the AR judge must be DiT(cfg, causal=True)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = model.cfg.vocab_size
        if tokenizer.vocab_size > self.vocab_size:
            raise JudgeError(f"AR judge: its vocabulary ({self.vocab_size}) is smaller than the tokenizer's "
                             f"({tokenizer.vocab_size}, {tokenizer.name}): trained on other data?")
        self.max_tokens = model.cfg.max_seq_len - 1  # + BOS
        self.name = name

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        x = x.to(device, torch.long)
        bos = torch.full_like(x[:, :1], self.vocab_size)
        seen: list[torch.Tensor] = []
        hook = self.model.output_layer.norm_final.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            logits = self.model(torch.cat([bos, x], dim=1))[..., :self.vocab_size]
        finally:
            hook.remove()
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, x.unsqueeze(-1)).squeeze(-1)
        return logp.cpu(), seen[0][:, 1:].float().cpu()


class HFTextJudge(TextJudge):
    """A transformers causal LM and its tokenizer from one local directory (safetensors only, never
    downloaded), e.g. GPT-2 large saved with ``save_pretrained``. No BOS: the first token is unscored."""

    def __init__(self, local_dir: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoModelForCausalLM

        path = Path(local_dir)
        if not path.is_dir():
            raise JudgeError(f"judge model directory not found: {path} (eval.judge)")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                              use_safetensors=True).to(device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise JudgeError(f"{path}: cannot load a causal LM with safetensors weights: {e}") from None
        self.tokenizer = load_tokenizer(str(path))
        self.max_tokens = int(getattr(self.model.config, "max_position_embeddings", 1024))
        self.name = path.resolve().name

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.model.parameters()).device
        x = x.to(device, torch.long)
        out = self.model(x, output_hidden_states=True)
        logp = torch.full(x.shape, float("nan"), dtype=torch.float64)
        scored = torch.log_softmax(out.logits[:, :-1].double(), dim=-1).gather(-1, x[:, 1:].unsqueeze(-1))
        logp[:, 1:] = scored.squeeze(-1).cpu()
        return logp, out.hidden_states[-1].float().cpu()


def build_text_judge(cfg: RunConfig, tokenizer: Tokenizer, device: torch.device) -> TextJudge | None:
    """``eval.judge``: "" (none), "ar" (the AR stage's export at eval.ar_path, with the run's
    tokenizer) or a local Hugging Face directory holding a causal LM and its tokenizer."""
    if not cfg.eval.judge:
        return None
    if cfg.eval.judge == "ar":
        from trainer.runtime.checkpoint import load_model

        path = Path(cfg.eval.ar_path)
        if not (path / "export.json").is_file():
            raise JudgeError(f"eval.ar_path: no AR export at {path} (export.json missing): run the AR stage "
                             f"(python -m trainer.jobs.pretrain --ar) first")
        model, _ = load_model(path, "ema", causal=True)
        return OwnARTextJudge(model.to(device), tokenizer)
    return HFTextJudge(cfg.eval.judge, device)


# --------------------------------------------------------------------------------------------------
# Decoding and retokenising
# --------------------------------------------------------------------------------------------------
def decode(samples: torch.Tensor | np.ndarray, tokenizer: Tokenizer) -> list[str]:
    """Each sample (ids of the model's tokenizer) as text; a MASK left in a sample is an error."""
    rows = np.asarray(samples.cpu() if isinstance(samples, torch.Tensor) else samples)
    if rows.size and int(rows.max()) >= tokenizer.vocab_size:
        raise JudgeError(f"samples hold id {int(rows.max())} outside the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size}, {tokenizer.name}): a MASK left, or another tokenizer")
    return [tokenizer.decode(r.tolist()) for r in rows]


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """Keep one leading EOS (a wrapped row's BOS: context, never scored), then the tokens up to and
    including the first EOS after them; nothing after it."""
    ids = list(ids)
    start = 0
    while start < len(ids) and ids[start] == eos_id:
        start += 1
    body = ids[start:]
    if eos_id in body:
        body = body[:body.index(eos_id) + 1]
    return ([eos_id] if start else []) + body


def retokenise(texts: Sequence[str], judge: TextJudge, cut_eos: bool = True) -> list[list[int]]:
    """The judge's ids of each text, cut after the first EOS, truncated to the judge's context."""
    out = []
    for ids in judge.tokenizer.encode_batch(list(texts)):
        if cut_eos:
            ids = cut_at_eos(ids, judge.tokenizer.eos_id)
        out.append(ids[:judge.max_tokens])
    return out


def _batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    """(index range, padded Long [B, T], lengths) in order; padding goes at the end, which a causal
    judge never reads for the positions that matter."""
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(1, max(len(s) for s in chunk))
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for i, s in enumerate(chunk):
            x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        yield start, x, torch.tensor([len(s) for s in chunk])


def score_per_sample(judge: TextJudge, seqs: list[list[int]], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of the judge's ids: (total NLL in nats, number of scored tokens), float64 [n] and
    int64 [n]. A leading EOS (the row's BOS) is context: the judge reads it, as it read it in
    training, but it is not scored."""
    nll = np.zeros(len(seqs), dtype=np.float64)
    count = np.zeros(len(seqs), dtype=np.int64)
    eos = judge.tokenizer.eos_id
    for start, x, lengths in _batches(seqs, batch_size, eos):
        logp, _ = judge.run(x)
        valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        valid &= ~torch.isnan(logp)
        valid[:, 0] &= x[:, 0] != eos
        nll[start:start + x.shape[0]] = (-logp.where(valid, torch.zeros_like(logp))).sum(dim=1).numpy()
        count[start:start + x.shape[0]] = valid.sum(dim=1).numpy()
    return nll, count


def score(judge: TextJudge, seqs: list[list[int]], batch_size: int = 32) -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of the judge's id sequences (``score_per_sample``
    summed)."""
    nll, count = score_per_sample(judge, seqs, batch_size)
    return float(nll.sum()), int(count.sum())


def gen_ppl_text(judge: TextJudge, texts: Sequence[str], batch_size: int = 32) -> dict:
    """The field's generative perplexity of decoded samples (see the module docstring), with each
    sample's NLL sum and scored-token count: gen-NLL is their ratio of sums, and samples drawn with
    the same noise pair up across models (trainer/evaluation/paired.py ``ratio``)."""
    nll, count = score_per_sample(judge, retokenise(texts, judge), batch_size)
    total, n = float(nll.sum()), int(count.sum())
    return {"gen_ppl": math.exp(total / n) if n else float("nan"), "gen_nll": total / n if n else float("nan"),
            "judge_tokens": n, "gen_nll_sum_per_sample": [round(float(v), 6) for v in nll],
            "judge_tokens_per_sample": [int(v) for v in count]}


def features(judge: TextJudge, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """The judge's final hidden state at each text's last token, float32 [n, d] (MAUVE's features).
    Texts are not cut at EOS: a continuation is compared as written."""
    seqs = [s if s else [judge.tokenizer.eos_id] for s in retokenise(texts, judge, cut_eos=False)]
    out = np.zeros((len(seqs), 0), dtype=np.float32)
    rows = []
    for _, x, lengths in _batches(seqs, batch_size, judge.tokenizer.eos_id):
        _, hidden = judge.run(x)
        rows.append(hidden[torch.arange(x.shape[0]), lengths - 1].numpy())
    return np.concatenate(rows) if rows else out


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25) -> float:
    """MAUVE of two feature sets (``mauve-text``; the 'hf' extra)."""
    try:
        import mauve
    except ImportError:
        raise JudgeError("MAUVE needs the 'mauve-text' package: pip install -e '.[hf]'") from None
    out = mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed, verbose=False,
                              num_buckets=max(2, min(len(p_features), len(q_features)) // 10))
    return float(out.mauve)


# --------------------------------------------------------------------------------------------------
# Held-out text: prefix-conditioned samples, the likelihood bound
# --------------------------------------------------------------------------------------------------
def prefix_tokens(cfg: RunConfig) -> int:
    return cfg.eval.prefix_tokens or max(1, cfg.data.seq_len // 4)


def conditioned_samples(model: nn.Module, cfg: RunConfig, rows: torch.Tensor, steps: int, prefix: int,
                        seed: int, device: torch.device, temperature: float = 1.0,
                        sampler: SamplerConfig | None = None) -> torch.Tensor:
    """Continuations of held-out ``rows``: their first ``prefix`` tokens clamped, the rest sampled
    (at ``temperature`` and with ``sampler``, default ``sampling.*``, as the unconditional samples of
    the same evaluation row)."""
    mask_id = cfg.model.vocab_size
    denoise = sampling.make_denoiser(model, mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for chunk in rows.split(cfg.eval.batch_size):
        out.append(sampling.sample_diffusion(
            denoise, chunk.shape[0], cfg.data.seq_len, steps, mask_id, noise_eps=cfg.diffusion.noise_eps,
            sampling_eps=cfg.diffusion.sampling_eps, generator=gen, device=device,
            cache=cfg.sampling.cache and not cfg.model.time_conditioning, prefix=chunk[:, :prefix],
            temperature=temperature, **sampling.sampler_options(sampler or cfg.sampling)).cpu())
    return torch.cat(out)


@torch.no_grad()
def elbo_bound(model: nn.Module, cfg: RunConfig, rows: torch.Tensor, device: torch.device, seed: int = 0) -> dict:
    """MDLM's NLL bound (nats/token) on held-out rows, one antithetic time per row, fixed noise;
    with its standard error over rows and the perplexity bound exp(nll)."""
    mask_id, eps = cfg.model.vocab_size, cfg.diffusion.noise_eps
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    per_row = []
    for x0 in rows.split(cfg.eval.batch_size):
        x0 = x0.to(device, torch.long)
        t = diffusion.sample_times(x0.shape[0], gen, cfg.diffusion.train_eps, cfg.diffusion.antithetic)
        xt = diffusion.mask_tokens(x0.cpu(), t, mask_id, eps, gen).to(device)
        sigma = diffusion.sigma_of_t(t, eps).to(device) if cfg.model.time_conditioning else None
        logits = model(xt, sigma, rows=xt == mask_id)
        log_probs = diffusion.masked_log_probs(logits, mask_id)
        per_row.append(diffusion.elbo_nll_at(log_probs, x0, xt, t.to(device), mask_id, eps).double().cpu())
    v = torch.cat(per_row)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"elbo_nll": float(v.mean()), "elbo_nll_se": se, "elbo_ppl": math.exp(float(v.mean())),
            "elbo_rows": int(len(v))}


class TextEvaluation:
    """Everything text needs in the evaluation job: the run's tokenizer, the judge, held-out rows."""

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, judge: TextJudge | None, valid: torch.Tensor,
                 device: torch.device):
        self.cfg, self.tokenizer, self.judge, self.device = cfg, tokenizer, judge, device
        self.valid = valid

    @classmethod
    def build(cls, cfg: RunConfig, run_dir: Path, device: torch.device) -> TextEvaluation:
        from trainer.data.prepared import data_dir, load_data_info, load_split

        ddir = data_dir(cfg.data, run_dir)
        info = load_data_info(ddir)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if info["tokenizer"] != tokenizer.name:
            raise JudgeError(f"{ddir / 'data.json'}: prepared with tokenizer {info['tokenizer']}, but "
                             f"data.tokenizer={cfg.data.tokenizer} is {tokenizer.name}")
        valid = torch.from_numpy(np.asarray(load_split(ddir, "valid"), dtype=np.int64))
        return cls(cfg, tokenizer, build_text_judge(cfg, tokenizer, device), valid, device)

    def decode(self, samples: torch.Tensor) -> list[str]:
        return decode(samples, self.tokenizer)

    def sample_lines(self, samples: torch.Tensor) -> list[str]:
        """One line per sample (newlines shown as \\n), for samples.txt and TensorBoard."""
        return [t.replace("\\", "\\\\").replace("\n", "\\n") for t in self.decode(samples)]

    def measure(self, model: nn.Module, rows: list[dict]) -> dict:
        """Add the text measures to the sweep's rows (which still hold ``_samples``): retokenised
        gen-PPL (replacing the id-level one), entropy, MAUVE; return the model-level measures."""
        cfg = self.cfg
        n_mauve = min(cfg.eval.mauve_samples, len(self.valid))
        held_out = self.valid[:n_mauve]
        p = prefix_tokens(cfg)
        q_feats = None
        if self.judge is not None and n_mauve >= 2:
            q_feats = features(self.judge, self.decode(held_out[:, p:]), cfg.eval.batch_size)
        named = {sp.name: sp for sp in cfg.eval.samplers}
        for row in rows:
            samples = row["_samples"]  # its entropy (per sample) is the sweep's (sweep.quality_row)
            row.update(gen_ppl=None, gen_nll=None, judge_tokens=None, mauve=None)
            if self.judge is None:
                continue
            row.update(gen_ppl_text(self.judge, self.decode(samples), cfg.eval.batch_size))
            if q_feats is not None:
                cont = conditioned_samples(model, cfg, held_out, row["steps"], p, cfg.eval.seed + 1, self.device,
                                           temperature=float(row.get("temperature") or 1.0),
                                           sampler=named.get(row.get("sampler")))
                p_feats = features(self.judge, self.decode(cont[:, p:]), cfg.eval.batch_size)
                row["mauve"] = mauve_score(p_feats, q_feats)
                row["mauve_samples"] = int(n_mauve)
        bound = elbo_bound(model, cfg, self.valid[:max(cfg.eval.elbo_rows, 1)], self.device, seed=cfg.eval.seed)
        return {"judge": self.judge.name if self.judge else None, "tokenizer": self.tokenizer.name,
                "prefix_tokens": p, **bound}

    def reference(self) -> dict:
        """Held-out text as a model row ("data"): its sample entropy (the target of the report's
        matched-diversity reads, as the true source's is for synthetic data) and, with a judge, its
        gen-PPL (what a perfect sampler would score). Rows of the validation split, as many as the
        evaluation draws samples."""
        rows = self.valid[:self.cfg.eval.num_samples]
        ent = sequence_entropies(rows)
        out = {"model": "data", "round": None, "steps": None, "temperature": None, "samples": int(rows.shape[0]),
               "entropy": float(ent.mean()),
               "entropy_se": float(ent.std(ddof=1) / math.sqrt(ent.size)) if ent.size > 1 else None,
               "gen_ppl": None, "gen_nll": None}
        if self.judge is not None:
            scored = gen_ppl_text(self.judge, self.decode(rows), self.cfg.eval.batch_size)
            out.update(gen_ppl=scored["gen_ppl"], gen_nll=scored["gen_nll"], judge_tokens=scored["judge_tokens"])
        return out
