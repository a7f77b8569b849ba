#!/usr/bin/env python3
"""Small but real training job for gridq parameter sweeps.

Trains a binary logistic-regression classifier with mini-batch stochastic
gradient descent on a synthetic dataset, and reports training and validation
metrics.  It stands in for a real machine-learning training script: it takes
hyper-parameters as command-line options, prints progress once per epoch and
writes its final metrics as one JSON object for gridq to collect.

Dataset (generated deterministically from ``--seed``):
    ``--n_samples`` points with 10 standard-normal features; a random linear
    "teacher" (weights and bias) labels each point by the sign of its score,
    then 5 % of the labels are flipped as noise.  The first 80 % of the points
    are the training set, the last 20 % the validation set.

Model: p(y=1 | x) = sigmoid(w . x + b), trained on the mean cross-entropy
loss plus an optional L2 penalty ``--l2 / 2 * |w|^2`` on the weights.

Output:
    one line per epoch, e.g.
        ``epoch 3/10 loss=0.4123 val_loss=0.4301 val_acc=0.8125``
    and, as the last stdout line, ``metrics: <json>``, where the JSON object
    holds loss, val_loss, val_acc, epochs, lr, batch_size, seed, duration_s.
    The same object is written to the path in the GRIDQ_RESULT environment
    variable (set by the gridq worker) and to ``--out PATH`` when given.

The computation is numerically safe for any positive finite learning rate
(the sigmoid and the log-loss are computed in stable forms and the weights
are kept finite), and fast: pure Python, well under a second with the
defaults.  Only the Python 3 standard library is used (Python >= 3.9).
"""

import argparse
import json
import math
import os
import random
import sys
import time

N_FEATURES = 10        # number of input features
LABEL_NOISE = 0.05     # fraction of labels flipped at random
VAL_FRACTION = 0.2     # share of the samples held out for validation
MAX_LOGIT = 500.0      # |w.x + b| is clipped to this in sigmoid and loss
MAX_WEIGHT = 1e6       # weights are clipped to [-MAX_WEIGHT, MAX_WEIGHT]


# --------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------

def positive_float(text):
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a finite number > 0, got %r" % text)
    return value


def non_negative_float(text):
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError("must be a finite number >= 0, got %r" % text)
    return value


def int_at_least(minimum):
    """Build an argparse type accepting integers >= ``minimum`` (any if None).

    Integral floats such as ``"5.0"`` are accepted too, because sweep tools
    (like numpy.arange in mlframework) sometimes produce them.
    """
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not an integer: %r" % text)
        if not value.is_integer():
            raise argparse.ArgumentTypeError("not an integer: %r" % text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError("must be >= %d, got %r" % (minimum, text))
        return int(value)
    parse.__name__ = "int"  # shown by argparse in "invalid int value" errors
    return parse


def parse_args(argv=None):
    """Parse and validate the command line (errors exit with code 2)."""
    parser = argparse.ArgumentParser(
        description="Logistic regression with mini-batch SGD on synthetic data.")
    parser.add_argument("--lr", type=positive_float, default=0.1,
                        help="learning rate, > 0 (default 0.1)")
    parser.add_argument("--epochs", type=int_at_least(1), default=10,
                        help="number of passes over the training set, >= 1 (default 10)")
    parser.add_argument("--batch_size", type=int_at_least(1), default=32,
                        help="mini-batch size, >= 1 (default 32)")
    parser.add_argument("--seed", type=int_at_least(None), default=0,
                        help="seed for the dataset and the shuffling (default 0)")
    parser.add_argument("--n_samples", type=int_at_least(10), default=2000,
                        help="number of samples in the dataset, >= 10 (default 2000)")
    parser.add_argument("--l2", type=non_negative_float, default=0.0,
                        help="L2 regularisation strength, >= 0 (default 0)")
    parser.add_argument("--shuffle", action="store_true",
                        help="reshuffle the training set before every epoch")
    parser.add_argument("--out", metavar="PATH",
                        help="also write the final metrics JSON to PATH")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def make_dataset(n_samples, seed):
    """Generate ``(train, val)`` lists of ``(features, label)`` pairs.

    Deterministic for a given seed: a random linear teacher labels standard
    normal points, and LABEL_NOISE of the labels are flipped.
    """
    rng = random.Random(seed)
    teacher_w = [rng.gauss(0.0, 1.0) for _ in range(N_FEATURES)]
    teacher_b = rng.gauss(0.0, 0.5)
    samples = []
    for _ in range(n_samples):
        x = [rng.gauss(0.0, 1.0) for _ in range(N_FEATURES)]
        score = teacher_b + sum(wi * xi for wi, xi in zip(teacher_w, x))
        y = 1 if score > 0 else 0
        if rng.random() < LABEL_NOISE:
            y = 1 - y
        samples.append((x, y))
    n_val = max(1, int(round(n_samples * VAL_FRACTION)))
    return samples[:-n_val], samples[-n_val:]


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------

def clip(value, limit):
    """Clip ``value`` to ``[-limit, limit]``."""
    return -limit if value < -limit else (limit if value > limit else value)


def logit(w, b, x):
    """Return the clipped score ``w . x + b``."""
    return clip(b + sum(wi * xi for wi, xi in zip(w, x)), MAX_LOGIT)


def sigmoid(z):
    """Numerically stable logistic function (never overflows)."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def log_loss(z, y):
    """Cross-entropy of label ``y`` for score ``z``, in a stable form.

    Equal to ``-y*log(sigmoid(z)) - (1-y)*log(1-sigmoid(z))`` but computed as
    ``max(z, 0) - y*z + log(1 + exp(-|z|))``, which never takes the log of 0.
    """
    return max(z, 0.0) - y * z + math.log1p(math.exp(-abs(z)))


def evaluate(w, b, data):
    """Return ``(mean cross-entropy, accuracy)`` of the model on ``data``."""
    total_loss = 0.0
    correct = 0
    for x, y in data:
        z = logit(w, b, x)
        total_loss += log_loss(z, y)
        if (z > 0) == (y == 1):
            correct += 1
    return total_loss / len(data), correct / len(data)


def sgd_epoch(w, b, train, order, lr, batch_size, l2):
    """Run one epoch of mini-batch SGD over ``train`` in ``order``.

    Updates the weight list ``w`` in place and returns the new bias.
    """
    n_features = len(w)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        grad_w = [0.0] * n_features
        grad_b = 0.0
        for index in batch:
            x, y = train[index]
            error = sigmoid(logit(w, b, x)) - y  # d loss / d z
            for j in range(n_features):
                grad_w[j] += error * x[j]
            grad_b += error
        scale = lr / len(batch)
        for j in range(n_features):
            # Gradient step plus L2 decay; clipping keeps weights finite
            # even when a huge lr * l2 makes the decay oscillate.
            updated = w[j] - scale * grad_w[j] - lr * l2 * w[j]
            w[j] = clip(updated, MAX_WEIGHT)
        b = clip(b - scale * grad_b, MAX_WEIGHT)
    return b


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def write_json(path, obj):
    """Write ``obj`` as one JSON object to ``path``; exit 1 on failure."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(obj, handle)
            handle.write("\n")
    except OSError as error:
        print("train.py: cannot write metrics to %s: %s" % (path, error),
              file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    """Train, report per-epoch progress and write the final metrics."""
    args = parse_args(argv)
    started = time.perf_counter()

    job_id = os.environ.get("GRIDQ_JOB_ID") or "local"
    attempt = os.environ.get("GRIDQ_ATTEMPT") or "1"
    print("train: job %s attempt %s lr=%g epochs=%d batch_size=%d seed=%d "
          "n_samples=%d l2=%g shuffle=%s"
          % (job_id, attempt, args.lr, args.epochs, args.batch_size, args.seed,
             args.n_samples, args.l2, str(args.shuffle).lower()), flush=True)

    train, val = make_dataset(args.n_samples, args.seed)
    # Separate generator for shuffling, so the data do not depend on it.
    shuffle_rng = random.Random(args.seed + 1)

    w = [0.0] * N_FEATURES
    b = 0.0
    order = list(range(len(train)))
    loss = val_loss = val_acc = float("nan")
    for epoch in range(1, args.epochs + 1):
        if args.shuffle:
            shuffle_rng.shuffle(order)
        b = sgd_epoch(w, b, train, order, args.lr, args.batch_size, args.l2)
        loss, _ = evaluate(w, b, train)
        val_loss, val_acc = evaluate(w, b, val)
        print("epoch %d/%d loss=%.4f val_loss=%.4f val_acc=%.4f"
              % (epoch, args.epochs, loss, val_loss, val_acc), flush=True)

    metrics = {
        "loss": round(loss, 6),
        "val_loss": round(val_loss, 6),
        "val_acc": round(val_acc, 6),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "duration_s": round(time.perf_counter() - started, 4),
    }
    result_path = os.environ.get("GRIDQ_RESULT")
    if result_path:
        write_json(result_path, metrics)
    if args.out:
        write_json(args.out, metrics)
    print("metrics: " + json.dumps(metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
