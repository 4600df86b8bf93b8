"""DyMU's dynamic ToMe ("dtome"; Wang et al., arXiv 2504.17040, reference code MikeWangWZHL/dymu,
src/open_clip/tome.py), as a token transform.

ToMe's bipartite matching (``tome.bipartite_match``: A/B alternate over all tokens, protected prefix
tokens, cosine similarity of the head-averaged keys, each A token's best B match), but block ``l`` merges
*every* A token whose best-match similarity exceeds a threshold ``tau_l`` (strictly, as the reference),
optionally only among each image's ``cap`` best-matching A tokens (the reference's
``max_r_per_instance``). Size-weighted merging and proportional attention (``+ log(size)``) as ToMe.
So the number of tokens merged depends on the image.

A batch keeps the batch maximum: each image's surviving tokens come first, as the reference's merge writes
them (prefix tokens, the unmerged A tokens, then the B tokens, which decides the next block's A/B split; an
image none of whose pairs exceeds the threshold keeps its tokens in place, as the reference's per-image path
returns ``do_nothing``), and the rest of its rows are padding (x = 0, size = 0; ``TokenTransform`` with
``pad=True``). Padding never merges nor receives a merge in later blocks; proportional attention's
``log(0) = -inf`` hides it from every query; with class-token pooling its outputs are never read.

Thresholds are calibrated without gradients (``calibrate``), as the reference does with
``update_threshold``: each calibration batch runs with *batch-level* merging (block ``l`` merges the
``r_l * B`` best-matching A tokens of the whole batch of ``B`` images, whichever image they are in);
every image is re-laid out as the reference's batched path does, merges or not; the batch's threshold
sample is the best-match similarity ranked just after them (index ``r_l * B`` in
descending order, i.e. the (r_l·B + 1)-th largest, the largest one *not* merged), clamped at >= 0;
``tau_l`` is the plain mean of the samples over the batches. A block with ``r_l = 0`` (or one never
sampled) keeps ``tau_l = +inf`` and never merges (the reference's initial threshold 1.0, which cosine
similarity can only exceed by rounding).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from edgetok.errors import EdgetokError
from edgetok.vit.token_transform import TokenTransform, apply_transform
from edgetok.vit.methods.tome_torch import Matching, bipartite_match, parse_r_schedule

INF = math.inf


def _per_layer(value, depth: int, what: str) -> list:
    """``value`` for every block: a list of ``depth`` entries, or one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != depth:
            raise EdgetokError(f"{what} has {len(value)} entries but the model has {depth} blocks")
        return list(value)
    return [value] * depth


class DToMe:
    name = "dtome"
    proportional_attention = True
    data_dependent = True  # the count left depends on the image: batches are padded (pooling must skip padding)

    def __init__(self, r: list[int], thresholds: list[float] | None = None, cap: int | list | None = None):
        """``r``: per block, the mean number of tokens to merge that calibration aims at (0: the block never
        merges). ``thresholds``: per block ``tau_l`` (``+inf``: never merges; default: all ``+inf``, i.e.
        the dense model until ``calibrate`` sets them). ``cap``: at most this many merges per image and
        block (an int, or a per-block list with None for no cap)."""
        depth = len(r)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r):
            raise EdgetokError(f"dtome r {r} must hold non-negative integers")
        thresholds = [INF] * depth if thresholds is None else _per_layer(thresholds, depth, "--thresholds")
        try:
            thresholds = [float(t) for t in thresholds]
        except (TypeError, ValueError):
            raise EdgetokError(f"dtome thresholds {thresholds} must be numbers (inf: the block never merges)") from None
        if any(math.isnan(t) for t in thresholds):
            raise EdgetokError("dtome thresholds must be numbers, not NaN (inf: the block never merges)")
        caps = _per_layer(cap, depth, "--cap")
        if not all(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 0) for c in caps):
            raise EdgetokError(f"--cap {cap} must be a non-negative integer (merges per image and block)")
        self.r = list(r)
        self.thresholds = thresholds
        self.cap = caps
        self.calibration: dict | None = None  # what calibrate() did (and measured)
        self.expected_tokens: list[tuple[float, float]] = []  # per block: mean tokens in, after (see plan_layer)
        self.merges: dict[int, torch.Tensor] = {}  # per block, from the last forward: merges per image [B]
        self.tokens: dict[int, torch.Tensor] = {}  # per block, from the last forward: real tokens after, per image
        self._samples: list[list[float]] | None = None  # threshold samples while calibrating
        self._last: tuple[int, torch.Tensor] | None = None  # (block, real-row mask [B, N]) of the last step

    # -- planning -------------------------------------------------------------------------------------

    def active(self, layer: int) -> bool:
        """Whether block ``layer`` can merge at all (calibration needs the blocks with r > 0)."""
        return self.r[layer] > 0 or self.thresholds[layer] != INF

    def params(self, amounts: list[int]) -> dict:
        def number(t):
            return None if math.isinf(t) else t  # JSON has no infinity; None: never merges

        params = {
            "target_r_per_layer": self.r,
            "thresholds": [number(t) for t in self.thresholds],
            "cap": self.cap[0] if len(set(self.cap)) == 1 else self.cap,
            "proportional_attention": True,
            "data_dependent": True,
            "expected_tokens_per_layer": [[round(a, 2), round(b, 2)] for a, b in self.expected_tokens],
        }
        if self.calibration is not None:
            params["calibration"] = self.calibration
        return params

    def plan_layer(self, layer: int, tokens: int, prefix: int) -> tuple[int, int]:
        """(amount, tokens left at most). The count left depends on the image, so the plan holds the upper
        bound (nothing merged); the expected mean is kept in ``expected_tokens`` (and ``params``).

        ``amount`` is ``layer + 1`` for a block that can merge (``transform`` reads the block's threshold
        and cap from it), 0 for one that cannot."""
        if layer >= len(self.r):
            raise EdgetokError(f"dtome has r for {len(self.r)} blocks but the model has more")
        most = (tokens - prefix) // 2
        if layer == 0:
            if self.r[0] > most:
                raise EdgetokError(f"r={self.r[0]} is too large for block 0: it has {tokens - prefix} mergeable "
                                   f"tokens, so r can be at most {most}; lower --r")
            self.expected_tokens = []
        mean_in = self.expected_tokens[-1][1] if self.expected_tokens else float(tokens)
        self.expected_tokens.append((mean_in, mean_in - self.expected_merges(layer, mean_in, prefix)))
        return (layer + 1 if self.active(layer) else 0), tokens

    def expected_merges(self, layer: int, tokens: float, prefix: int) -> float:
        """Mean merges per image in this block: as measured after calibration when that was done, else the
        target r (clamped to what the block can merge, as the reference does) where the block merges."""
        measured = (self.calibration or {}).get("measured") or {}
        if "mean_merges_per_layer" in measured:
            return float(measured["mean_merges_per_layer"][layer])
        if self.thresholds[layer] == INF:
            return 0.0
        return float(min(self.r[layer], max(int(tokens - prefix) // 2, 0)))

    # -- the step ---------------------------------------------------------------------------------------

    def transform(self, amount: int, q, k, scale, prefix: int, class_token: bool = True, size=None):
        """The merge of one block, from its keys ``k`` [B, H, N, D] averaged over heads: (TokenTransform
        padded to the batch maximum, None: weights are the sizes) or None when the block does not merge.

        Rows with ``size == 0`` (padding) take no part in the matching. ``size`` [B, N, 1] may be given;
        otherwise the padding is the one this method's previous step in the same forward left (rows past
        each image's count; the first merging block of a forward has none)."""
        if amount == 0:
            return None
        layer = amount - 1
        calibrating = self._samples is not None
        if (self.r[layer] == 0) if calibrating else (self.thresholds[layer] == INF):
            return None
        valid = self._real_rows(layer, k, size)
        matching = bipartite_match(k.mean(dim=1), prefix, valid)
        best = matching.best
        cap = self.cap[layer]
        if cap is not None:  # only each image's `cap` best-matching A tokens may merge
            best = best.masked_fill(_rank(best) >= cap, -INF)
        if calibrating:
            merged = self._batch_level_merges(layer, best, k.shape[2], prefix)
            # the batched path re-lays every image out (unless r, clamped to the tokens there are, is 0)
            nothing = min(self.r[layer], (k.shape[2] - prefix) // 2) <= 0
            in_place = torch.full((merged.shape[0],), nothing, dtype=torch.bool, device=merged.device)
        else:
            merged = best > self.thresholds[layer]
            in_place = _in_place(matching, self.thresholds[layer])
        return self._build(layer, merged, matching, valid, in_place), None

    def reduce(self, amount: int, taps: dict, x, size, prefix: int, class_token: bool = True):
        """The step on the tokens themselves: (tokens, sizes), padded to the batch maximum.

        In the form an export takes: merging every chosen A token into its match keeps the shapes (a one-hot
        MatMul over all rows, as the token transform does), and only dropping the merged rows has a count
        that follows the image: one ``edgetok::TokenPrune`` node. The same rows, order and arithmetic as the
        token transform; calibration (batch-level merges, eager only) goes through ``transform``."""
        if amount == 0:
            return x, size
        layer = amount - 1
        if self._samples is not None:
            step = self.transform(amount, taps["q"], taps["k"], taps.get("scale"), prefix, class_token, size=size)
            return (x, size) if step is None else apply_transform(step[0], x, size, size)
        if self.thresholds[layer] == INF:
            return x, size
        from edgetok.vit.dynamic import token_prune

        valid = size[..., 0] > 0
        matching = bipartite_match(taps["k"].mean(dim=1), prefix, valid)
        best = matching.best
        if self.cap[layer] is not None:
            best = best.masked_fill(_rank(best) >= self.cap[layer], -INF)
        merged = (best > self.thresholds[layer]).to(x.dtype)  # [B, n_a]
        rows = torch.arange(x.shape[1], device=x.device)
        a_rows = torch.arange(best.shape[1], device=x.device) * 2 + matching.a_start  # A tokens' positions
        sources = (a_rows[:, None] == rows).to(x.dtype) * merged[..., None]  # [B, n_a, N]: merged A rows
        targets = ((matching.match * 2 + matching.b_start)[..., None] == rows).to(x.dtype) * merged[..., None]
        packed = torch.cat([x * size, size], dim=-1)
        total = packed + targets.transpose(1, 2) @ (sources @ packed)  # each B row plus what merges into it
        channels = x.shape[-1]
        weight = total[..., channels:]
        merged_x = total[..., :channels] / weight.clamp_min(torch.finfo(x.dtype).tiny)  # padding: 0 / tiny = 0
        keep = 1.0 - sources.amax(dim=1)  # every row but the merged A tokens
        # DyMU's (and ToMe's) output order: prefix, A, B; an image that merges nothing keeps its own
        order = _merge_order(x, prefix, matching)[None, :].expand(x.shape[0], -1)
        order = torch.where(_in_place(matching, self.thresholds[layer])[:, None], rows[None, :], order)
        pruned, pruned_size, _ = token_prune(merged_x.gather(1, order[..., None].expand(-1, -1, channels)),
                                             weight.gather(1, order[..., None]), keep.gather(1, order), prefix)
        if not torch.onnx.is_in_onnx_export():
            self.merges[layer] = merged.sum(dim=1).to(torch.int64)
            self.tokens[layer] = (pruned_size[..., 0] > 0).sum(dim=1)
        return pruned, pruned_size

    def _real_rows(self, layer: int, k, size) -> torch.Tensor:
        batch, n = k.shape[0], k.shape[2]
        if size is not None:
            return size[..., 0] > 0
        if self._last is not None and layer > self._last[0]:  # a later block of the same forward
            valid = self._last[1]
            if tuple(valid.shape) != (batch, n):
                raise RuntimeError(f"dtome block {layer}: {batch}x{n} token rows, but its previous step left "
                                   f"{tuple(valid.shape)}; another reduction ran in between")
            return valid
        return torch.ones(batch, n, dtype=torch.bool, device=k.device)

    def _batch_level_merges(self, layer: int, best, n: int, prefix: int) -> torch.Tensor:
        """Calibration (the reference's batch-level ToMe): the r·B best edges of the batch merge; the next
        best similarity, clamped at >= 0, is this batch's threshold sample."""
        r = min(self.r[layer], (n - prefix) // 2)  # as the reference clamps r to the tokens there are
        if r <= 0 or best.numel() == 0:
            return torch.zeros_like(best, dtype=torch.bool)
        flat = best.flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        rb = r * best.shape[0]
        sample = float(flat[order[min(rb, flat.numel() - 1)]])
        self._samples[layer].append(max(sample, 0.0))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order[:rb]] = True
        return (chosen & (flat > -INF)).view_as(best)  # never padding or a token with nothing to match

    def _build(self, layer: int, merged, matching: Matching, valid, in_place) -> TokenTransform:
        """The TokenTransform of merging A tokens ``merged`` [B, n_a] into their matches: each image's
        survivors as the merge writes them (prefix, unmerged A, B; in place where ``in_place`` [B]), then
        padding (index N: the zero row)."""
        n, device = valid.shape[1], valid.device
        merged_rows = torch.zeros_like(valid)
        merged_rows[:, matching.a_start :: 2] = merged
        survive = valid & ~merged_rows
        counts = survive.sum(dim=1)
        width = int(counts.max())
        written = _merge_order(valid, min(matching.a_start, matching.b_start), matching)  # that minimum is the prefix
        written = torch.where(in_place[:, None], torch.arange(n, device=device), written)  # [B, N]
        alive = survive.gather(1, written)
        first = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices[:, :width]
        order = written.gather(1, first)  # survivors first, in the order the merge writes them
        real = torch.arange(width, device=device) < counts[:, None]
        keep = torch.where(real, order, n)
        out_row = torch.empty(valid.shape, dtype=torch.int64, device=device)
        out_row.scatter_(1, written, alive.cumsum(dim=1) - 1)  # output row of each survivor
        n_merged = merged.sum(dim=1)
        most = int(n_merged.max()) if merged.numel() else 0
        src = dst = None
        if most:
            src_a = torch.sort((~merged).to(torch.int8), dim=1, stable=True).indices[:, :most]  # merged A tokens
            moved = torch.arange(most, device=device) < n_merged[:, None]
            dst_rows = torch.gather(out_row, 1, torch.gather(matching.match, 1, src_a) * 2 + matching.b_start)
            src = torch.where(moved, src_a * 2 + matching.a_start, n)
            dst = torch.where(moved, dst_rows, 0)  # the zero row adds nothing to row 0
        self._last = (layer, real)
        self.merges[layer], self.tokens[layer] = n_merged, counts
        return TokenTransform(keep=keep, src=src, dst=dst, pad=True)

    # -- calibration ------------------------------------------------------------------------------------

    def begin_calibration(self) -> None:
        self._samples = [[] for _ in self.r]

    def end_calibration(self) -> list[float]:
        """Thresholds from the samples since ``begin_calibration``: their mean per block (+inf: none)."""
        samples, self._samples = self._samples or [[] for _ in self.r], None
        self.thresholds = [sum(s) / len(s) if s else INF for s in samples]
        return self.thresholds


def _merge_order(x: torch.Tensor, prefix: int, matching: Matching) -> torch.Tensor:
    """Row positions in the order a merge writes them: prefix tokens, set A, set B (each in position order),
    as the reference's ``x_new[:n_a] = src; x_new[n_a:] = dst`` does; the next block splits A/B on that."""
    from edgetok.vit.dynamic import dynamic_size

    rows = dynamic_size(x, 1)
    return torch.cat([torch.arange(prefix, device=x.device), torch.arange(matching.a_start, rows, 2, device=x.device),
                      torch.arange(matching.b_start, rows, 2, device=x.device)])


def _in_place(matching: Matching, threshold: float) -> torch.Tensor:
    """[B] bool: the images none of whose A tokens has a match above ``threshold`` (before any cap). DyMU's
    per-image path (``bipartite_soft_matching`` with a threshold, batch 1) returns ``do_nothing`` for them, so
    their tokens stay where they are; any other image is re-laid out as prefix, A, B (even when a cap of 0
    lets nothing merge, as there)."""
    return ~(matching.best > threshold).any(dim=1)


def _rank(best: torch.Tensor) -> torch.Tensor:
    """Each A token's rank by best-match similarity within its image (0: best; ties by position)."""
    if torch.onnx.is_in_onnx_export():  # ONNX TopK ranks equal values by index, as the stable sort
        order = best.topk(best.shape[-1], dim=-1).indices
    else:
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(best.shape[-1], device=best.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def make_dtome(depth: int, r: int | None = None, r_schedule=None, thresholds: list[float] | None = None,
               cap: int | list | None = None) -> DToMe:
    """The method from CLI/recipe options: ``--r R`` (mean merges per block that calibration aims at) or
    ``--r-schedule`` (ToMe's forms), optional thresholds (e.g. from an earlier calibration) and cap."""
    if r is not None and r_schedule is not None:
        raise EdgetokError("give --r or --r-schedule, not both")
    if r is None and r_schedule is None:
        if thresholds is None:
            raise EdgetokError("--method dtome needs --r N (mean tokens merged per block) or thresholds")
        r = 0
    if r is not None and r < 0:
        raise EdgetokError(f"--r {r} must be >= 0")
    per_layer, _ = parse_r_schedule(r if r is not None else r_schedule, depth)
    return DToMe(per_layer, thresholds, cap)


def _patched_with(vit, method: DToMe) -> None:
    """Patch ``vit`` with ``method`` unless it already is; refuse a model patched with another method."""
    from edgetok.vit.reduction import reduce_vit

    state = getattr(vit.blocks[0], "_edgetok_state", None) if vit.blocks else None
    if state is None:
        reduce_vit(vit, method)
    elif state.method is not method:
        raise EdgetokError(f"{vit.name} is already reduced with {state.method.name}; calibrate dtome on an "
                           "unpatched model or one patched with this dtome")


def _image_batches(dataset, batch: int, dtype):
    for start in range(0, len(dataset), batch):
        items = [dataset[i][0] for i in range(start, min(start + batch, len(dataset)))]  # a broken image: one line
        yield torch.stack(items).to(dtype)


def calibrate(vit, method: DToMe, images: str, batch: int = 32, measure: bool = True) -> list[float]:
    """Set ``method.thresholds`` from the images of the ImageFolder ``images`` (read and preprocessed as
    ``edgetok eval`` does), in batches of ``batch``; patches ``vit`` with ``method`` if it is not yet.

    With ``measure``, the images are run once more with the new thresholds and the merges per block are
    recorded (``method.calibration["measured"]``, which ``plan_layer`` then uses as the expected mean)."""
    from edgetok.images import image_folder

    if batch < 1:
        raise EdgetokError(f"--batch {batch} must be >= 1")
    if not any(r > 0 for r in method.r):
        raise EdgetokError("dtome calibration needs r > 0 in some block: give --r N (mean tokens merged per block)")
    dataset = image_folder(images, vit.preprocessing, "--calibrate")
    if len(dataset) == 0:
        raise EdgetokError(f"--calibrate {images} has class folders but no images")
    dtype = next(vit.module.parameters()).dtype
    passes, total = iter(["calibrating thresholds", "measuring merges"]), -(-len(dataset) // batch)

    def batches():  # a line per batch on stderr: DeiT-S takes minutes over a calibration folder on a CPU
        import sys

        what = next(passes, "pass")
        for i, images in enumerate(_image_batches(dataset, batch, dtype), 1):
            yield images
            print(f"· dtome {what}: batch {i}/{total} ({min(i * batch, len(dataset))}/{len(dataset)} images)",
                  file=sys.stderr, flush=True)

    thresholds = calibrate_batches(vit, method, batches, measure)
    method.calibration = {"images": str(Path(images).resolve()), "samples": len(dataset), "batch": batch,
                          **(method.calibration or {})}
    return thresholds


def calibrate_batches(vit, method: DToMe, batches, measure: bool = True) -> list[float]:
    """``calibrate`` on preprocessed image batches: ``batches()`` yields [B, C, H, W] tensors (called
    once per pass)."""
    _patched_with(vit, method)
    calibrated = {"batches": 0, "target_r_per_layer": list(method.r)}
    method.begin_calibration()
    try:
        with torch.no_grad():
            for images in batches():
                method.merges, method.tokens = {}, {}
                vit.module(images)
                calibrated["batches"] += 1
    finally:
        thresholds = method.end_calibration()
    if calibrated["batches"] == 0:
        raise EdgetokError("dtome calibration got no images")
    if measure:
        calibrated["measured"] = measure_merges(vit, method, batches)
    method.calibration = calibrated
    return thresholds


def measure_merges(vit, method: DToMe, batches) -> dict:
    """Run ``method`` (its thresholds) over ``batches()``: mean merges and tokens per block per image, and
    the mean multiply-accumulates per image (each image's own token counts)."""
    from edgetok.vit.flops import block_macs, vit_macs

    depth, images = len(method.r), 0
    merges, tokens, macs = [0.0] * depth, [0.0] * depth, 0.0
    with torch.no_grad():
        for batch in batches():
            method.merges, method.tokens = {}, {}
            vit.module(batch)
            b = batch.shape[0]
            count = torch.full((b,), float(vit.num_tokens))
            for layer in range(depth):
                n_in = count
                if layer in method.merges:
                    merges[layer] += float(method.merges[layer].sum())
                    count = method.tokens[layer].to(torch.float64)
                tokens[layer] += float(count.sum())
                macs += float(sum(block_macs(int(a), int(o), vit.embed_dim, vit.attn_dim, vit.mlp_hidden)
                                  for a, o in zip(n_in, count)))
            images += b
    macs = macs / images + vit_macs(vit, [])  # + patch embedding and head
    return {"samples": images, "mean_merges_per_layer": [round(m / images, 3) for m in merges],
            "mean_tokens_per_layer": [round(t / images, 3) for t in tokens], "mean_gmacs": round(macs / 1e9, 6)}
