"""From one inference's record to a result row's measured columns.

The reference output is computed ONCE in the runner's process: the unsharded
model (``model.forward``, what ``single`` computes) on the same weights and input
every node builds from the job's seed and files. Agreement is the share of batch
rows whose top-1 class (ViT) or next token (GPT-2) equals the reference's.

How ranks are aggregated (one row per inference, N ranks):
- ``compute_s``, ``comm_s``, ``wait_s``, ``serialize_s``: those of the *critical
  rank*, the rank whose forward pass took longest (its compute + comm is what the
  latency is made of); ``critical_rank`` names it. ``single`` therefore reports
  rank 0, the only rank that works.
- ``compute_s_mean``, ``comm_s_mean``: means over the ranks that did any work (at least 1% of the
  critical rank's time).
- ``bytes_sent``: application payload sent by all ranks together (trace byte counts);
  ``bytes_sent_max_rank``: the most any one rank sent.
- ``latency_s``: client-observed, from sending the request to the last rank's answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reference:
    input: torch.Tensor
    output: torch.Tensor  # logits [B, n_out] of the unsharded model
    labels: torch.Tensor | None = None  # ground-truth classes [B] when the input is a labelled dataset


def make_reference(model, tokens: int, batch: int, seed: int, dataset: str | None = None) -> Reference:
    """The single-device output of ``model`` (built like every node builds it) on the job's input."""
    labels = None
    if dataset:
        from testbed.models.datasets import load_split

        inp, labels = load_split(dataset)
    else:
        inp = model.make_input(tokens, batch=batch, seed=seed)
    with torch.inference_mode():
        out = model(inp)
    return Reference(inp, out.float(), None if labels is None else torch.as_tensor(labels))


def output_columns(output: torch.Tensor | None, ref: Reference) -> dict:
    """agreement, max_abs_err and (labelled input) accuracy of an inference's output."""
    if output is None:
        return {"agreement": float("nan"), "max_abs_err": float("nan"), "accuracy": float("nan")}
    out = output.float().reshape(ref.output.shape)
    top = out.argmax(-1)
    cols = {"agreement": (top == ref.output.argmax(-1)).float().mean().item(),
            "max_abs_err": (out - ref.output).abs().max().item(),
            "accuracy": float("nan")}
    if ref.labels is not None:
        cols["accuracy"] = (top == ref.labels.reshape(top.shape)).float().mean().item()
    return cols


def timing_columns(latency_s: float, nodes: list) -> dict:
    """Per-row timing and byte columns from per-rank records (testbed.node.records.RankResult)."""
    crit = max(nodes, key=lambda n: n.compute_s + n.comm_s)
    # an idle rank (e.g. ranks 1.. of `single`) records only microseconds of bookkeeping
    busy = [n for n in nodes if n.compute_s + n.comm_s >= 0.01 * (crit.compute_s + crit.comm_s)]
    return {
        "latency_s": latency_s,
        "compute_s": crit.compute_s, "comm_s": crit.comm_s, "wait_s": crit.wait_s, "serialize_s": crit.serialize_s,
        "critical_rank": crit.rank,
        "compute_s_mean": sum(n.compute_s for n in busy) / len(busy),
        "comm_s_mean": sum(n.comm_s for n in busy) / len(busy),
        "bytes_sent": sum(int(n.bytes_sent) for n in nodes),
        "bytes_sent_max_rank": max(int(n.bytes_sent) for n in nodes),
    }
