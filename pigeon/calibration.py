"""Calibration: temperature scaling (Guo et al. 2017) and expected calibration error (ECE).

Why: the Predictor reports a confidence and uncertainty radii from the cell probabilities; those
only mean something if a 70% answer is right about 70% of the time. One scalar temperature,
fitted on the validation split, fixes most of a head's over-confidence without changing its ranking.
"""

from __future__ import annotations

import numpy as np
import torch


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-1 prediction: Σ_b |B|/n · |acc(B) - conf(B)|, equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip((conf * n_bins).astype(np.int64), 0, n_bins - 1)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / max(len(conf), 1))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on (validation) labels."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return float(np.clip(t, 1e-2, 1e2)) if np.isfinite(t) else 1.0


__all__ = ["ece", "softmax", "fit_temperature"]
