"""Text evaluation in the field's protocol (MDLM, SDTT, Duo): what a researcher compares against.

* **Generative perplexity.** Samples are decoded to text with the model's tokenizer (special tokens
  kept, as MDLM's ``batch_decode``) and re-encoded with the judge's; which of the judge's tokens
  count is ``eval.gen_ppl`` (trainer/evaluation/protocols.py states each rule from its reference
  code): ``mdlm`` (default; MDLM's and Duo's mask over the whole retokenised sample), ``sdtt``
  (every position; the sample's own ids when the judge shares the vocabulary, as SDTT) or
  ``first_doc`` (up to the first EOS). Each sample's NLL sum and scored-token count are kept, so
  models pair up sample by sample (trainer/evaluation/paired.py).
* **Entropy beside it**, twice: ``entropy``, the field's (Duo's ``record_entropy``: each whole
  sample's unigram entropy over the model's own ids, the mean over samples; computed by the sweep,
  ``quality.sequence_entropies``), and ``gen_entropy``, the same statistic over exactly the judge
  tokens gen-PPL scored. Held-out text gives the reference row: its entropy is the target the
  report reads every model's gen-PPL at (its temperature sweep's frontier).
* **MAUVE** (Pillutla et al. 2021, ``mauve-text``), ``eval.mauve_protocol``: ``heldout`` (default,
  cheap): the first ``eval.prefix_tokens`` tokens of held-out rows are clamped, the model fills in
  the rest, and MAUVE compares the continuations (prefix removed) with the held-out continuations;
  ``sdtt``: SDTT's settings (trainer/evaluation/mauve_protocol.py), mean and std over MAUVE seeds.
  Features: the final hidden state at each sequence's last token (MAUVE's own recipe) of
  ``eval.mauve_features`` (e.g. GPT-2 large), else of the judge.
* **The likelihood bound** (MDLM's ELBO, nats/token, and its perplexity bound) on held-out rows with
  fixed noise, so two evaluations of the same model agree exactly.
* **LAMBADA** zero-shot as SDTT computes it (``eval.lambada``, trainer/evaluation/lambada.py).

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
from trainer.evaluation import protocols
from trainer.evaluation.judges import Judge, build_judge
from trainer.evaluation.quality import JudgeError, sequence_entropies
from trainer.method import diffusion, sampling


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


def retokenise(texts: Sequence[str], judge: Judge, cut_eos: bool = True) -> list[list[int]]:
    """The judge's ids of each text (special tokens in the text, e.g. ``<|endoftext|>``, read as
    such, as MDLM's ``eval_retokenize`` does), cut after the first EOS when ``cut_eos``
    (``first_doc``), truncated to the judge's context."""
    out = []
    for ids in judge.tokenizer.encode_batch(list(texts)):
        if cut_eos:
            ids = cut_at_eos(ids, judge.tokenizer.eos_id)
        out.append(ids[:judge.max_tokens])
    return out


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether an id means the same token to both tokenizers, so one's ids can be scored by a judge
    of the other as they are: the same size and EOS, and the same files (the content hash that ends
    a ``HFTokenizer`` name; a byte tokenizer's name is its whole name) or else every id decoding to
    the same text (e.g. GPT-2's tokenizer saved in two folders with different config files)."""
    if a.vocab_size != b.vocab_size or a.eos_id != b.eos_id:
        return False
    if a.name.rsplit("-", 1)[-1] == b.name.rsplit("-", 1)[-1]:
        return True
    return all(a.decode([i]) == b.decode([i]) for i in range(a.vocab_size))


def judge_sequences(judge: Judge, texts: Sequence[str], protocol: str,
                    ids: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """What the judge reads for each sample under ``protocol`` (trainer/evaluation/protocols.py):
    ``first_doc`` the retokenised text cut after its first EOS; ``mdlm`` the whole retokenised
    text; ``sdtt`` the sample's own ids when given (SDTT scores the model's GPT-2 ids as they are,
    ``run_eval.py:227-236``; the caller passes them only when the judge shares the vocabulary),
    else the whole retokenised text. Always truncated to the judge's context."""
    if protocol == "sdtt" and ids is not None:
        return [[int(i) for i in s][:judge.max_tokens] for s in ids]
    return retokenise(texts, judge, cut_eos=protocol == "first_doc")


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


def score_per_sample(judge: Judge, seqs: list[list[int]], batch_size: int = 32,
                     protocol: str = "first_doc") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence of the judge's ids: (total NLL in nats, number of scored tokens, entropy of the
    scored tokens' histogram in nats), float64 [n], int64 [n], float64 [n]. Which tokens count is
    the protocol's (``protocols.scored_mask``); a position the judge cannot score (NaN) never does."""
    nll = np.zeros(len(seqs), dtype=np.float64)
    count = np.zeros(len(seqs), dtype=np.int64)
    ent = np.full(len(seqs), math.nan)
    eos = judge.tokenizer.eos_id
    for start, x, lengths in _batches(seqs, batch_size, eos):
        logp, _ = judge.run(x)
        valid = protocols.scored_mask(x, lengths, eos, protocol) & ~torch.isnan(logp)
        stop = start + x.shape[0]
        nll[start:stop] = (-logp.where(valid, torch.zeros_like(logp))).sum(dim=1).numpy()
        count[start:stop] = valid.sum(dim=1).numpy()
        ent[start:stop] = protocols.masked_entropies(x, valid)
    return nll, count, ent


def score(judge: Judge, seqs: list[list[int]], batch_size: int = 32,
          protocol: str = "first_doc") -> tuple[float, int]:
    """(total NLL in nats, number of scored tokens) of the judge's id sequences (``score_per_sample``
    summed)."""
    nll, count, _ = score_per_sample(judge, seqs, batch_size, protocol)
    return float(nll.sum()), int(count.sum())


def gen_ppl_text(judge: Judge, texts: Sequence[str], batch_size: int = 32, protocol: str = "mdlm",
                 ids: Sequence[Sequence[int]] | None = None) -> dict:
    """The field's generative perplexity of decoded samples under ``protocol`` (``eval.gen_ppl``,
    trainer/evaluation/protocols.py), with each sample's NLL sum and scored-token count (samples drawn
    with the same noise pair up across models: trainer/evaluation/paired.py ``ratio``) and the entropy
    of exactly the scored tokens (``gen_entropy``, per sample then the mean, as the field's sample
    entropy). ``ids``: the samples' own ids, scored as they are under ``sdtt``."""
    nll, count, ent = score_per_sample(judge, judge_sequences(judge, texts, protocol, ids), batch_size, protocol)
    mean_nll = protocols.gen_nll(nll, count, protocol)
    has = ent[~np.isnan(ent)]
    return {"gen_ppl": math.exp(mean_nll) if count.sum() else float("nan"), "gen_nll": mean_nll,
            "gen_protocol": protocol, "judge_tokens": int(count.sum()),
            "gen_entropy": float(has.mean()) if has.size else None,
            "gen_entropy_se": float(has.std(ddof=1) / math.sqrt(has.size)) if has.size > 1 else None,
            "gen_nll_sum_per_sample": [round(float(v), 6) for v in nll],
            "judge_tokens_per_sample": [int(v) for v in count]}


def features(judge: Judge, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """The judge's final hidden state at each text's last token, float32 [n, d] (MAUVE's features).
    Texts are not cut at EOS: a continuation is compared as written."""
    return features_ids(judge, retokenise(texts, judge, cut_eos=False), batch_size)


def features_ids(judge: Judge, seqs: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
    """``features`` of id sequences of the judge's own vocabulary, read as they are (SDTT feeds
    GPT-2 ids straight to GPT-2 large, ``run_eval.py:55-67``); truncated to its context."""
    seqs = [[int(i) for i in s][:judge.max_tokens] or [judge.tokenizer.eos_id] for s in seqs]
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
                        length: int | None = None, sampler: SamplerConfig | None = None) -> torch.Tensor:
    """Continuations of held-out ``rows``: their first ``prefix`` tokens clamped, the rest sampled
    (at ``temperature`` and with ``sampler``, default ``sampling.*``, as the unconditional samples of
    the same evaluation row), ``length`` tokens in all (default data.seq_len; SDTT's MAUVE samples 100)."""
    mask_id = cfg.model.vocab_size
    denoise = sampling.make_denoiser(model, mask_id, cfg.diffusion.noise_eps, cfg.model.time_conditioning)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for chunk in rows.split(cfg.eval.batch_size):
        out.append(sampling.sample_diffusion(
            denoise, chunk.shape[0], length or cfg.data.seq_len, steps, mask_id, noise_eps=cfg.diffusion.noise_eps,
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
    """Everything text needs in the evaluation job: the run's tokenizer, the judge, held-out rows,
    and for SDTT's protocols the feature model and the prompt / LAMBADA files (read when measured)."""

    def __init__(self, cfg: RunConfig, tokenizer: Tokenizer, judge: Judge | None, valid: torch.Tensor,
                 device: torch.device, feature_model: Judge | None = None):
        self.cfg, self.tokenizer, self.judge, self.device = cfg, tokenizer, judge, device
        self.valid = valid
        self.feature_model = feature_model or judge  # MAUVE's features: eval.mauve_features, else the judge
        self._shared: dict[int, bool] = {}  # same_vocabulary per judge tokenizer, computed once

    def _shares_vocabulary(self, other: Tokenizer) -> bool:
        if id(other) not in self._shared:
            self._shared[id(other)] = same_vocabulary(self.tokenizer, other)
        return self._shared[id(other)]

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
        feats = build_judge(cfg, device, tokenizer, key="mauve_features")
        return cls(cfg, tokenizer, build_judge(cfg, device, tokenizer), valid, device, feats)

    def decode(self, samples: torch.Tensor) -> list[str]:
        return decode(samples, self.tokenizer)

    def sample_lines(self, samples: torch.Tensor) -> list[str]:
        """One line per sample (newlines shown as \\n), for samples.txt and TensorBoard."""
        return [t.replace("\\", "\\\\").replace("\n", "\\n") for t in self.decode(samples)]

    def gen_ppl(self, samples: torch.Tensor) -> dict:
        """``gen_ppl_text`` of the model's samples under ``eval.gen_ppl``; under ``sdtt`` a judge of
        the same vocabulary scores the sample ids as they are (SDTT's route)."""
        protocol = self.cfg.eval.gen_ppl
        ids = samples.tolist() if protocol == "sdtt" and self._shares_vocabulary(self.judge.tokenizer) else None
        return gen_ppl_text(self.judge, self.decode(samples), self.cfg.eval.batch_size, protocol, ids)

    def _features(self, rows: torch.Tensor, as_ids: bool = False) -> np.ndarray:
        """MAUVE features of rows of the model's ids: decoded and retokenised (the default protocol),
        or with ``as_ids`` read as they are by a feature model of the same vocabulary (SDTT's)."""
        fm = self.feature_model
        if as_ids and self._shares_vocabulary(fm.tokenizer):
            return features_ids(fm, rows.tolist(), self.cfg.eval.batch_size)
        return features(fm, self.decode(rows), self.cfg.eval.batch_size)

    def _sampler(self, row: dict) -> SamplerConfig | None:
        """The sampler a sweep row was drawn with (eval.samplers by name; None: sampling.*), so its
        MAUVE continuations are drawn the same way."""
        return {sp.name: sp for sp in self.cfg.eval.samplers}.get(row.get("sampler"))

    def _mauve_heldout(self, model: nn.Module, rows: list[dict]) -> None:
        """The cheap default: one continuation per held-out row after L/4 (eval.prefix_tokens) tokens,
        compared with the held-out continuation, the prefix left out, one MAUVE seed."""
        cfg = self.cfg
        n_mauve = min(cfg.eval.mauve_samples, len(self.valid))
        if self.feature_model is None or n_mauve < 2:
            return
        held_out, p = self.valid[:n_mauve], prefix_tokens(cfg)
        q_feats = self._features(held_out[:, p:])
        for row in rows:
            cont = conditioned_samples(model, cfg, held_out, row["steps"], p, cfg.eval.seed + 1, self.device,
                                       temperature=float(row.get("temperature") or 1.0),
                                       sampler=self._sampler(row))
            row.update(mauve=mauve_score(self._features(cont[:, p:]), q_feats), mauve_samples=int(n_mauve),
                       mauve_protocol="heldout")

    def _mauve_sdtt(self, model: nn.Module, rows: list[dict]) -> None:
        """SDTT's protocol (trainer/evaluation/mauve_protocol.py): prompts from eval.mauve_prompts,
        continuations per prompt, the prefix included, MAUVE's mean and std over seeds."""
        from trainer.evaluation import mauve_protocol

        ev = self.cfg.eval
        if self.feature_model is None or ev.mauve_samples < 2:
            return
        total = ev.mauve_prompt_tokens + ev.mauve_gen_tokens
        docs = mauve_protocol.load_prompts(ev.mauve_prompts, self.tokenizer, ev.mauve_samples,
                                           ev.mauve_min_doc_tokens, total)
        p_feats = self._features(docs, as_ids=True)
        for row in rows:
            cont = torch.cat([conditioned_samples(model, self.cfg, docs, row["steps"], ev.mauve_prompt_tokens,
                                                  ev.seed + 1 + k, self.device, length=total,
                                                  temperature=float(row.get("temperature") or 1.0),
                                                  sampler=self._sampler(row))
                              for k in range(ev.mauve_continuations)])
            row.update(mauve_protocol.mauve_over_seeds(p_feats, self._features(cont, as_ids=True), ev.mauve_seeds,
                                                       ev.mauve_scaling),
                       mauve_samples=int(cont.shape[0]), mauve_protocol="sdtt")

    def lambada(self, model: nn.Module) -> dict:
        """SDTT's LAMBADA (trainer/evaluation/lambada.py) on eval.lambada; {} when unset."""
        from trainer.evaluation import lambada

        cfg = self.cfg
        if not cfg.eval.lambada:
            return {}
        examples = lambada.load_examples(cfg.eval.lambada, self.tokenizer, getattr(self.tokenizer, "bos_id", None))
        longest = max(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        size = len(examples[longest][0]) + len(examples[longest][1])
        if size > cfg.model.max_seq_len:
            raise JudgeError(f"eval.lambada: example {longest + 1} of {cfg.eval.lambada} is {size} tokens with "
                             f"[BOS] and [EOS], longer than the model's context "
                             f"model.max_seq_len={cfg.model.max_seq_len}")
        return lambada.evaluate(model, examples, cfg.model.vocab_size, cfg.diffusion.noise_eps,
                                cfg.diffusion.sampling_eps, cfg.model.time_conditioning, self.device,
                                cfg.eval.lambada_t_samples, seed=cfg.eval.seed)

    def measure(self, model: nn.Module, rows: list[dict]) -> dict:
        """Add the text measures to the sweep's rows (which still hold ``_samples``): retokenised
        gen-PPL (replacing the id-level one) under eval.gen_ppl with the entropy of the scored tokens
        (the rows' ``entropy`` stays the field's: each whole sample's own ids), MAUVE under
        eval.mauve_protocol; return the model-level measures (the bound, LAMBADA)."""
        for row in rows:
            row.update(gen_ppl=None, gen_nll=None, judge_tokens=None, mauve=None)
            if self.judge is not None:
                row.update(self.gen_ppl(row["_samples"]))
        if self.cfg.eval.mauve_protocol == "sdtt":
            self._mauve_sdtt(model, rows)
        else:
            self._mauve_heldout(model, rows)
        cfg = self.cfg
        bound = elbo_bound(model, cfg, self.valid[:max(cfg.eval.elbo_rows, 1)], self.device, seed=cfg.eval.seed)
        sdtt_mauve = cfg.eval.mauve_protocol == "sdtt"
        return {"judge": self.judge.name if self.judge else None, "tokenizer": self.tokenizer.name,
                "gen_protocol": cfg.eval.gen_ppl, "mauve_protocol": cfg.eval.mauve_protocol,
                "mauve_features": self.feature_model.name if self.feature_model else None,
                "prefix_tokens": cfg.eval.mauve_prompt_tokens if sdtt_mauve else prefix_tokens(cfg),
                **bound, **self.lambada(model)}

    def reference(self) -> dict:
        """Held-out text as a model row ("data"): its sample entropy (the target of the report's
        matched-diversity reads, as the true source's is for synthetic data) and, with a judge, its
        gen-PPL under the same protocol (what a perfect sampler would score) and the entropy of the
        tokens it scored. Rows of the validation split, as many as the evaluation draws samples."""
        rows = self.valid[:self.cfg.eval.num_samples]
        ent = sequence_entropies(rows)
        out = {"model": "data", "round": None, "steps": None, "temperature": None, "samples": int(rows.shape[0]),
               "entropy": float(ent.mean()),
               "entropy_se": float(ent.std(ddof=1) / math.sqrt(ent.size)) if ent.size > 1 else None,
               "gen_ppl": None, "gen_nll": None}
        if self.judge is not None:
            scored = self.gen_ppl(rows)
            out.update({k: scored[k] for k in ("gen_ppl", "gen_nll", "gen_protocol", "judge_tokens",
                                               "gen_entropy", "gen_entropy_se")})
        return out
