#!/usr/bin/env python3
"""Readouts compared on a tag's frozen features (what a head could get from them).

Features come from `tagllm embed --positions P` (one JSON array per line: the final
hidden states at the last P positions, side by side). For the ridge head as the trainer
fits it (features standardised, penalty chosen on validation), at growing numbers of
training rows and with the last position or all P; then two nonlinear readouts of the
last position, or the last --nonlinear-positions (RBF kernel ridge, a one-hidden-layer
MLP). Prints validation MSE and Pearson r.

  tagllm embed --template 'The molecule <SMILES> {smiles} has druglikeness <QED>' \\
      --data data/qed/train.jsonl --positions 10 > train.emb   # and the same for val
  python3 scripts/repro/readouts.py --train-emb train.emb --val-emb val.emb \\
      --train data/qed/train.jsonl --val data/qed/val.jsonl --target qed
"""
import argparse
import json

import numpy as np


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def scores(pred, yv):
    return float(np.mean((pred - yv) ** 2)), float(np.corrcoef(pred, yv)[0, 1])


def ridge(X, y, Xv, penalty):
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z, Zv = (X - mu) / sd, (Xv - mu) / sd
    n, f = Z.shape
    # The smaller of the two systems: primal for many rows, dual for many features.
    if n < f:
        a = np.linalg.solve(Z @ Z.T + penalty * n * np.eye(n), y - y.mean())
        pred = Zv @ (Z.T @ a)
    else:
        pred = Zv @ np.linalg.solve(Z.T @ Z + penalty * n * np.eye(f), Z.T @ (y - y.mean()))
    return pred + y.mean()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ["--train-emb", "--val-emb", "--train", "--val", "--target"]:
        ap.add_argument(a, required=True)
    ap.add_argument("--hidden-size", type=int, default=576)
    ap.add_argument("--nonlinear-positions", type=int, default=1)
    args = ap.parse_args()
    X, Xv = np.array(rows(args.train_emb)), np.array(rows(args.val_emb))
    y = np.array([r[args.target] for r in rows(args.train)])
    yv = np.array([r[args.target] for r in rows(args.val)])
    d, positions = args.hidden_size, X.shape[1] // args.hidden_size
    print(f"{len(y)} training rows, {len(yv)} validation rows, {positions} positions; "
          f"validation variance {yv.var():.5f}")
    sizes = [n for n in [1000, 2000, 4000, 8000, 16000] if n < len(y)] + [len(y)]
    for p in sorted({1, positions}):
        for n in sizes:
            (mse, r), penalty = min((scores(ridge(X[:n, -p * d:], y[:n], Xv[:, -p * d:], lam), yv), lam)
                                    for lam in [1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0])
            print(f"ridge, last {p} position(s), {n} rows: {mse:.5f}, r {r:.3f} (penalty {penalty})", flush=True)

    from sklearn.kernel_ridge import KernelRidge
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    k = args.nonlinear_positions * d
    scaler = StandardScaler().fit(X[:, -k:])
    Z, Zv = scaler.transform(X[:, -k:]), scaler.transform(Xv[:, -k:])
    gammas = [g / args.nonlinear_positions for g in [3e-4, 1e-3, 3e-3]]
    t = (y - y.mean()) / y.std()
    back = lambda pred: pred * y.std() + y.mean()
    for gamma in gammas:
        for alpha in [0.03, 0.1, 1.0]:
            m = KernelRidge(kernel="rbf", gamma=gamma, alpha=alpha).fit(Z, t)
            mse, r = scores(back(m.predict(Zv)), yv)
            print(f"RBF kernel ridge, gamma {gamma:.2g}, alpha {alpha}: {mse:.5f}, r {r:.3f}", flush=True)
    for hidden in [64, 256]:
        for alpha in [0.1, 1.0, 3.0]:
            m = MLPRegressor(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=300,
                             early_stopping=True, random_state=0).fit(Z, t)
            mse, r = scores(back(m.predict(Zv)), yv)
            print(f"MLP, {hidden} hidden, alpha {alpha}: {mse:.5f}, r {r:.3f}", flush=True)


if __name__ == "__main__":
    main()
