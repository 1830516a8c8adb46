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
- ``latency_s``: client-observed, from sending the request to the last rank's answer (with
  ``generate`` > 0: prefill and every decode step).

Decode (``decode_columns``, from the rank that holds the generated tokens): ``ttft_s`` is its time
from the start of the inference to the first token (prefill: that token comes from prefill's
logits); the per-token times are the gaps between consecutive tokens (``generate - 1`` of them),
``tpot_median_s`` / ``tpot_p95_s`` their median and 95th percentile, ``tokens_per_s`` their count
over their sum (decode throughput, prefill excluded, as llama.cpp's eval rate);
``generated_agreement`` the share of generated ids equal to the single-device greedy decode.

Memory (``memory_columns``, reported by each node right after the inference): ``rss_mib`` is the
largest node's resident set, ``pss_mib`` the nodes' proportional set sizes added up (what they
take together: pages shared by co-located nodes count once). After the inference rather than after
the load, because a checkpoint is mapped lazily: its pages are resident once an inference has read
them. What each node held right after the load goes into the manifest (``memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Reference:
    input: torch.Tensor
    output: torch.Tensor  # logits [B, n_out] of the unsharded model
    labels: torch.Tensor | None = None  # ground-truth classes [B] when the input is a labelled dataset
    generated: torch.Tensor | None = None  # greedy token ids [B, generate] of the unsharded model


def make_reference(model, tokens: int, batch: int, seed: int, dataset: str | None = None,
                   generate: int = 0) -> Reference:
    """The single-device output of ``model`` (built like every node builds it) on the job's input,
    and its greedy continuation of ``generate`` tokens (testbed.methods.decode.greedy)."""
    labels = None
    if dataset:
        from testbed.models.datasets import load_split

        inp, labels = load_split(dataset)
    else:
        inp = model.make_input(tokens, batch=batch, seed=seed)
    with torch.inference_mode():
        out = model(inp)
    gen = None
    if generate:
        from testbed.methods.decode import greedy

        gen = greedy(model, inp, generate)
    return Reference(inp, out.float(), None if labels is None else torch.as_tensor(labels), gen)


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


def decode_columns(nodes: list, ref: Reference | None) -> dict:
    """Time to first token, per-token latency, tokens per second and agreement of the generated ids
    (see the module docstring); empty when the inference generated nothing."""
    holder = next((n for n in nodes if n.generated is not None), None) or next(
        (n for n in nodes if n.token_times_s), None)
    if holder is None or not holder.token_times_s:
        return {}
    t = torch.tensor(holder.token_times_s, dtype=torch.float64)
    gaps = t[1:] - t[:-1]
    nan = float("nan")
    cols = {"ttft_s": float(t[0]),
            "tpot_median_s": float(torch.quantile(gaps, 0.5)) if len(gaps) else nan,
            "tpot_p95_s": float(torch.quantile(gaps, 0.95)) if len(gaps) else nan,
            "tokens_per_s": len(gaps) / float(gaps.sum()) if len(gaps) and float(gaps.sum()) > 0 else nan,
            "generated_agreement": nan}
    if holder.generated is not None and ref is not None and ref.generated is not None:
        got = holder.generated.reshape(ref.generated.shape)
        cols["generated_agreement"] = (got == ref.generated).float().mean().item()
    return cols


def memory_columns(records: list) -> dict:
    """``rss_mib`` (largest process) and ``pss_mib`` (all processes together; NaN unless each could
    read it) from what node processes reported (testbed.node.records.RankResult after an inference,
    or LoadTimes after a load). Records with no figure (rss_kib 0: the in-process backend's ranks
    after the first, all in one process) are left out."""
    said = [t for t in records if t.rss_kib]
    pss = [t.pss_kib for t in said]
    return {"rss_mib": max(t.rss_kib for t in said) / 1024 if said else math.nan,
            "pss_mib": sum(pss) / 1024 if said and None not in pss else math.nan}
