"""Cross-fitted outcome model ghat (docs/math.md section 4).

Features: by default the masked mean of f_0's last hidden states over a text's real
tokens (:func:`mean_pooled_features`); or any user embedding callable texts -> [n, d]
(:func:`features_from_callable`). ``fit_outcome_model`` works on features only.

Cross-fitting: rows are split into K shuffled folds; fold k's model is fitted on the other
K-1 folds and predicts fold k, so ``oof_pred[i]`` never comes from a model that saw row i
(the condition for DR-CPO's guarantee). ``r2`` and ``rmse`` are out-of-fold. For *new*
texts (the direct-method set, generations) :meth:`OutcomeFit.predict` returns the
**average of the K fold models' predictions** (no refit on all rows), clipped to the
training outcome range; :meth:`OutcomeFit.outside_support` flags texts unlike the training
texts in ghat's feature space (both in support.py; docs/validity.md says why).

Kinds:
  - ``"ridge"`` (default): closed-form ridge on standardized features with an intercept.
    With ``alpha=None`` each fold picks alpha from a log grid by exact leave-one-out error
    on its training rows (one SVD per fold, all alphas at once).
  - ``"mlp"``: one hidden layer (64, GELU), full-batch Adam with weight decay, early
    stopping on 10% of the fold's training rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cpo_fast.models import collate, last_hidden
from cpo_fast.models import decoder as _decoder
from cpo_fast.pipeline.stages.data import Encoded
from cpo_fast.pipeline.stages.precompute import _model_device, length_sorted_batches
from cpo_fast.pipeline.stages.support import clip_to_range, fit_support

KINDS = ("ridge", "mlp")


def mean_pooled_features(model: Any, encoded: Encoded, batch_size: int = 32,
                         device: str | torch.device | None = None, *,
                         layers: str | Sequence[int] = "last") -> np.ndarray:
    """[n, d] float32: masked mean of the backbone's hidden states over each row's real
    tokens (BOS, prompt, response, EOS; no padding). No grad; eval mode.

    ``layers="last"``: the last hidden states (d = hidden size). ``"all"``: the means of
    every hidden state (embeddings included) side by side, d = (layers + 1) * hidden size;
    or a list of hidden-state indices (0 = embeddings, -1 = last). On a small LM trained
    by next-token SFT, the last layer alone keeps little of what a text *says* (on the
    synthetic corpus, ridge OOF R^2 0.07 with "last" vs 0.35 with "all"); for big models
    "all" is wide (use a few indices)."""
    dev = torch.device(device) if device is not None else _model_device(model)
    feats: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in length_sorted_batches(encoded, batch_size):
                b = collate(encoded, idx, pad_id=0)
                ids, mask = b["input_ids"].to(dev), b["attention_mask"].to(dev)
                if isinstance(layers, str) and layers == "last":
                    hs = [last_hidden(model, ids, mask)]
                else:
                    out = _decoder(model)(input_ids=ids, attention_mask=mask, use_cache=False,
                                          output_hidden_states=True)
                    hs = list(out.hidden_states)
                    if not isinstance(layers, str):
                        hs = [hs[i] for i in layers]
                    elif layers != "all":
                        raise ValueError(f"layers must be 'last', 'all' or a list of "
                                         f"indices, got {layers!r}.")
                m = mask.unsqueeze(-1).float()
                pooled = torch.cat([(h.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
                                    for h in hs], dim=-1).cpu().numpy()
                if feats is None:
                    feats = np.zeros((len(encoded), pooled.shape[1]), dtype=np.float32)
                feats[idx] = pooled
    finally:
        model.train(was_training)
    if feats is None:
        raise ValueError("mean_pooled_features: encoded has no rows.")
    return feats


def bag_of_words_features(encoded: Encoded, vocab_size: int, *,
                          normalize: bool = False) -> np.ndarray:
    """[n, vocab_size] float32 token counts per row (scored and prompt tokens alike);
    ``normalize`` divides by the row length. A model-free baseline featurizer: for
    lexicon-like outcomes it beats pooled hidden states of a small LM."""
    x = np.zeros((len(encoded), vocab_size), dtype=np.float32)
    for i, r in enumerate(encoded.input_ids):
        np.add.at(x[i], np.asarray(r, dtype=np.int64), 1.0)
        if normalize and r:
            x[i] /= len(r)
    return x


def features_from_callable(fn: Callable[[list[str]], Any], texts: list[str],
                           batch_size: int = 256) -> np.ndarray:
    """Call a user embedding model ``fn(list_of_texts) -> [m, d]`` (numpy, torch or
    lists) in batches and stack the results as float32 [n, d]."""
    parts = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        e = fn(chunk)
        if isinstance(e, torch.Tensor):
            e = e.detach().float().cpu().numpy()
        e = np.asarray(e, dtype=np.float32)
        if e.ndim != 2 or e.shape[0] != len(chunk):
            raise ValueError(f"embedding callable returned shape {e.shape} for {len(chunk)} "
                             "texts; it must return [len(texts), d].")
        parts.append(e)
    if not parts:
        raise ValueError("features_from_callable: texts is empty.")
    return np.concatenate(parts)


# --------------------------------------------------------------------------- models

@dataclass
class _Ridge:
    mu: np.ndarray
    sd: np.ndarray
    coef: np.ndarray
    intercept: float
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mu) / self.sd) @ self.coef + self.intercept


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    return (x - mu) / sd, mu, sd


def _spectral(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u [n, r], s^2 [r], v [p, r]) with z = u diag(s) v^T over the non-null directions.
    Tall z: eigendecomposition of the p x p Gram matrix (several times faster than an SVD);
    wide z: the SVD."""
    n, p = z.shape
    if p <= n:
        s2, v = np.linalg.eigh(z.T @ z)
        keep = s2 > max(float(s2.max()), 0.0) * 1e-10
        s2, v = s2[keep], v[:, keep]
        u = (z @ v) / np.sqrt(s2)
        return u, s2, v
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > max(float(s.max()), 0.0) * 1e-5
    return u[:, keep], s[keep] ** 2, vt[keep].T


def _fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float | None) -> _Ridge:
    z, mu, sd = _standardize(x)
    ym = y.mean()
    yc = y - ym
    u, s2, v = _spectral(z)
    uty = u.T @ yc
    if alpha is None:
        # exact leave-one-out residuals of ridge with intercept for every alpha on a grid:
        # e_loo = e / (1 - h_ii), h_ii = 1/n + sum_k u_ik^2 s_k^2 / (s_k^2 + alpha)
        n = len(y)
        scale = max(float(s2.mean()), 1e-12)
        grid = scale * np.logspace(-5, 2, 22)
        best, alpha = np.inf, float(grid[0])
        u2 = u**2
        for a in grid:
            f = s2 / (s2 + a)
            fitted = u @ (f * uty)
            hii = 1.0 / n + u2 @ f
            loo = (yc - fitted) / np.clip(1.0 - hii, 1e-9, None)
            err = float(np.mean(loo**2))
            if err < best:
                best, alpha = err, float(a)
    coef = v @ (np.sqrt(s2) / (s2 + alpha) * uty)
    return _Ridge(mu, sd, coef, float(ym), float(alpha))


class _MLP:
    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int, hidden: int = 64,
                 max_epochs: int = 500, weight_decay: float = 1e-3) -> None:
        z, self.mu, self.sd = _standardize(x)
        self.ym, self.ys = float(y.mean()), float(y.std() or 1.0)
        t = (y - self.ym) / self.ys
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(y))
        n_val = max(1, len(y) // 10)
        va, tr = perm[:n_val], perm[n_val:]
        g = torch.Generator().manual_seed(seed)
        d = x.shape[1]
        net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                  torch.nn.Linear(hidden, 1))
        with torch.no_grad():
            for p in net.parameters():  # seeded init, independent of the global RNG
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(p.shape[-1])))
        zt = torch.as_tensor(z, dtype=torch.float32)
        tt = torch.as_tensor(t, dtype=torch.float32)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=weight_decay)
        # small full-batch steps are dominated by thread start-up: run them on one thread
        threads = torch.get_num_threads()
        if z.size <= 2_000_000:
            torch.set_num_threads(1)
        try:
            best_state = self._train(net, opt, zt, tt, tr, va, max_epochs)
        finally:
            torch.set_num_threads(threads)
        if best_state is not None:
            with torch.no_grad():
                for p, b in zip(net.parameters(), best_state, strict=True):
                    p.copy_(b)
        self.net = net.eval()

    @staticmethod
    def _train(net: torch.nn.Module, opt: torch.optim.Optimizer, zt: torch.Tensor,
               tt: torch.Tensor, tr: np.ndarray, va: np.ndarray, max_epochs: int,
               patience: int = 20) -> list[torch.Tensor] | None:
        best, best_state, bad = np.inf, None, 0
        for _ in range(max_epochs):
            opt.zero_grad()
            loss = torch.mean((net(zt[tr]).squeeze(-1) - tt[tr]) ** 2)
            loss.backward()
            opt.step()
            with torch.no_grad():
                v = float(torch.mean((net(zt[va]).squeeze(-1) - tt[va]) ** 2))
            if v < best - 1e-6:
                best, bad = v, 0
                best_state = [p.detach().clone() for p in net.parameters()]
            else:
                bad += 1
                if bad >= patience:
                    break
        return best_state

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = torch.as_tensor((x - self.mu) / self.sd, dtype=torch.float32)
        with torch.no_grad():
            out = self.net(z).squeeze(-1).double().numpy()
        return out * self.ys + self.ym


@dataclass
class OutcomeFit:
    """Cross-fitted ghat. ``oof_pred[i]`` comes from the fold model that did not see row i;
    :meth:`predict` averages the K fold models (for texts outside the training rows)."""

    oof_pred: np.ndarray
    r2: float
    rmse: float
    folds: int
    kind: str
    fold_models: list[Any] = field(default_factory=list, repr=False)
    fold_of_row: np.ndarray | None = field(default=None, repr=False)
    y_range: tuple[float, float] | None = None  # predictions are clipped to it (support.py)
    support: Any = field(default=None, repr=False)  # support.FeatureSupport: the OOD test

    def predict(self, features: np.ndarray, *, clip: bool = True) -> np.ndarray:
        """Mean of the fold models, clipped to the training outcome range (``clip=False``:
        the raw extrapolation, for diagnostics)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [n, d], got shape {x.shape}.")
        pred = np.mean([m.predict(x) for m in self.fold_models], axis=0)
        return clip_to_range(pred, self.y_range) if clip else pred

    def outside_support(self, features: np.ndarray) -> np.ndarray | None:
        """Boolean [n] (True: unlike ghat's training texts), or None without a support test."""
        return None if self.support is None else self.support.outside(features)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "folds": self.folds, "r2_oof": self.r2,
                               "rmse_oof": self.rmse}
        if self.y_range is not None:
            out["bound"] = list(self.y_range)
        if self.support is not None:
            out["support"] = {"test": "shrunk Mahalanobis distance of ghat's features",
                              "quantile": self.support.quantile,
                              "threshold": self.support.threshold}
        return out


def fit_outcome_model(features: np.ndarray, y: np.ndarray, *, kind: str = "ridge",
                      folds: int = 5, seed: int = 0, alpha: float | None = None,
                      bound: bool = False, support: bool = True) -> OutcomeFit:
    """Cross-fit ghat on ``features`` [n, d] and outcomes ``y`` [n]; see the module doc.

    ``bound``: clip predictions for new texts (:meth:`OutcomeFit.predict`) to [min y, max y]
    (the pipeline's ``prepare`` always sets it; off here keeps the plain regression);
    ``support``: fit the out-of-support test on the features (support.py)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features must be [n, d] with n = len(y) = {len(y)}, "
                         f"got shape {x.shape}.")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("features and y must be finite (no NaN/inf).")
    if folds < 2:
        raise ValueError(f"folds must be >= 2 for cross-fitting, got {folds}.")
    n = len(y)
    if n < 2 * folds:
        raise ValueError(f"need at least 2 rows per fold: n={n} rows, folds={folds}.")
    rng = np.random.default_rng(seed)
    fold_of_row = np.empty(n, dtype=np.int64)
    fold_of_row[rng.permutation(n)] = np.arange(n) % folds
    oof = np.empty(n)
    models = []
    for k in range(folds):
        te, tr = fold_of_row == k, fold_of_row != k
        m = (_fit_ridge(x[tr], y[tr], alpha) if kind == "ridge"
             else _MLP(x[tr], y[tr], seed=seed + k))
        oof[te] = m.predict(x[te])
        models.append(m)
    # out-of-fold predictions stay the fold models' own (training texts are in support);
    # the bound applies to predict(), i.e. to new texts: the DM set and generations
    y_range = (float(y.min()), float(y.max())) if bound else None
    res = y - oof
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(res**2)) / sst if sst > 0 else float("nan")
    sup = None
    if support:
        sup = fit_support(x, fold_of_row=fold_of_row, seed=seed)
    return OutcomeFit(oof_pred=oof, r2=r2, rmse=float(np.sqrt(np.mean(res**2))),
                      folds=folds, kind=kind, fold_models=models, fold_of_row=fold_of_row,
                      y_range=y_range, support=sup)
