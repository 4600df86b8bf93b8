"""Target-only and speculative generation over exported decoders, with KV caches that roll back.

The caches hold every token but the last one generated; each call feeds the tokens the cache lacks.
A speculative round: the draft proposes k tokens one by one; the target scores the last token and the
k proposals in one (k+1)-token call; the longest agreeing prefix is kept (greedy) or tokens are
accepted by rejection sampling, so the output follows the target's distribution exactly; both caches
are cropped back to what was accepted. Which device a model runs on is only its backend's setting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetok import hf
from edgetok.errors import EdgetokError
from edgetok.llm.kv_decoder import Decoder
from edgetok.llm.pair import check_decoder, inside, read_manifest

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OrtDecoder(Decoder):
    """One exported decoder on ONNX Runtime, with its KV cache."""

    def __init__(self, path: Path, entry: dict, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        provider = PROVIDERS.get(device)
        if provider is None:
            raise EdgetokError(f"device {device!r} is unknown; choose {', '.join(PROVIDERS)}")
        if provider not in ort.get_available_providers():
            raise EdgetokError(f"onnxruntime here has no {provider} for --*-device {device}: pip install onnxruntime-gpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Two sessions in one process: a waiting one must not spin on the cores the other needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = [provider] + (["CPUExecutionProvider"] if device != "cpu" else [])
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.layers, self.kv_heads, self.head = entry["num_hidden_layers"], entry["num_key_value_heads"], entry["head_size"]
        self.device, self.threads = device, threads
        self.names = [o.name for o in self.session.get_outputs()]
        mask = next(i for i in self.session.get_inputs() if i.name == "attention_mask")
        self.tree = len(mask.shape) == 4  # the tree variant: a boolean [B, 1, q, past + q] mask, explicit positions
        self.history: list[tuple[int, float]] = []  # (tokens fed, seconds) of every call, kept across resets
        self.reset()

    def _empty(self) -> np.ndarray:
        return np.zeros((1, self.kv_heads, 0, self.head), np.float32)

    def _run(self, tokens: list[int], mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        inputs = {**self._tokens_in(tokens, positions), "attention_mask": mask, "position_ids": positions[None]}
        for i in range(self.layers):
            inputs[f"past_key_values.{i}.key"] = self.cache[2 * i]
            inputs[f"past_key_values.{i}.value"] = self.cache[2 * i + 1]
        start = time.perf_counter()
        out = self.session.run(None, inputs)
        self._record(len(tokens), time.perf_counter() - start)
        self.cache = out[1:]
        return out[0][0]

    def crop(self, length: int) -> None:
        """Forget every cached token from ``length`` on (rejected proposals): exact, a slice."""
        self.cache = [c[:, :, :length] for c in self.cache]

    def keep(self, rows: list[int]) -> None:
        """Keep only these cached rows, in this order (a tree's accepted path after the cache before it)."""
        index = np.asarray(rows, np.int64)
        self.cache = [np.take(c, index, axis=2) for c in self.cache]


BACKENDS = ("onnxruntime", "tensorrt")


def open_pair(folder: str, draft_device: str = "cpu", target_device: str = "cpu", draft_threads: int = 1,
              target_threads: int = 0, tree: bool = False, backend: str = "onnxruntime"):
    """(manifest, target, draft) of a pair (draft None for a target exported alone). The draft gets one thread by
    default: its kernels are too small to gain from more (measured here: 0.12 ms per step on one thread, 0.17 ms
    on two), and a second thread pool only competes with the target's. ``tree``: the target's tree-verify variant.
    ``backend`` tensorrt: the engines `edgetok build-engine PAIR` recorded (a GPU's, whatever the devices say)."""
    manifest = read_manifest(folder)
    target = open_decoder(folder, manifest, "target_tree" if tree else "target", backend, target_device,
                          target_threads)
    draft = None
    if manifest.get("draft"):
        draft = open_decoder(folder, manifest, "draft", backend, draft_device, draft_threads)
    return manifest, target, draft


def open_decoder(folder: str, manifest: dict, role: str, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int = 0):
    """One decoder of a pair: ``role`` target, target_tree or draft, on ONNX Runtime or as its engine."""
    if backend not in BACKENDS:
        raise EdgetokError(f"--backend {backend!r} for a pair is unknown; choose {', '.join(BACKENDS)}")
    entry = manifest["draft" if role == "draft" else "target"]
    if role == "target_tree" and not entry.get("tree"):
        raise EdgetokError(f"{folder} has no tree-verify target (target/tree.onnx); export the pair again with this "
                           "edgetok for --mode lookahead")
    if backend == "onnxruntime":
        relative = entry["tree"]["file"] if role == "target_tree" else entry["file"]
        decoder = OrtDecoder(inside(folder, relative, f"{role} file"), entry, device, threads)
        check_decoder(decoder.session, entry, role)  # the manifest describes this model (layers, KV heads, vocab)
        return decoder
    from edgetok.llm.trt_decoder import TrtDecoder

    engines = manifest.get("engines")
    if not engines or role not in engines:
        what = f"no {role} engine" if engines else "no engines"
        raise EdgetokError(f"{folder} has {what}; build them with `edgetok build-engine {folder}`")
    built = engines[role]
    library = built["backend"]["name"].replace("-", "_")  # tensorrt or tensorrt_rtx
    return TrtDecoder(inside(folder, built["file"], f"{role} engine"), entry, library)


def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    k_per_round: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        n = len(self.tokens)
        return {
            "tokens": self.tokens, "new_tokens": n, "prompt_tokens": self.prompt_tokens,
            # Prefill caches all prompt tokens but the last (the first decode step feeds it).
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": (self.prompt_tokens - 1) / self.prefill_s if self.prefill_s else None,
            "decode_s": self.decode_s, "decode_tokens_per_s": n / self.decode_s if self.decode_s else None,
            "rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.proposed if self.proposed else None,
            "mean_accepted_per_round": self.accepted / self.rounds if self.rounds else None,
            "mean_tokens_per_round": n / self.rounds if self.rounds else None,
        }


def _check_request(prompt: list[int], max_new: int, k: int, max_length: int | None, vocab: int) -> None:
    if not prompt:
        raise EdgetokError("the prompt is empty; give --prompt TEXT or --prompt-ids 1,2,3")
    if max_new < 1:
        raise EdgetokError(f"--max-new-tokens {max_new} must be >= 1")
    if k < 1:
        raise EdgetokError(f"--k {k} must be >= 1 (tokens the draft proposes per round)")
    if any(not 0 <= t < vocab for t in prompt):
        raise EdgetokError(f"--prompt-ids hold ids outside the vocabulary 0..{vocab - 1}")
    if max_length and len(prompt) + max_new > max_length:
        raise EdgetokError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {max_new} exceeds the pair's max "
                           f"length {max_length}; shorten the prompt or generate fewer tokens")


def _prefill(models: list[OrtDecoder], prompt: list[int]) -> float:
    """Every model caches the prompt but its last token (which the first step feeds)."""
    start = time.perf_counter()
    for m in models:
        m.reset()
        if len(prompt) > 1:
            m.feed(prompt[:-1])
    return time.perf_counter() - start


def generate_target(target: OrtDecoder, prompt: list[int], max_new: int, temperature: float = 0.0,
                    seed: int = 0, eos: int | None = None, max_length: int | None = None) -> Generation:
    _check_request(prompt, max_new, 1, max_length, 1 << 62)
    rng = np.random.default_rng(seed)
    prefill = _prefill([target], prompt)
    seq, out = list(prompt), []
    start = time.perf_counter()
    while len(out) < max_new:
        logits = target.feed(seq[target.length:])[-1]
        token = int(logits.argmax()) if temperature == 0 else int(rng.choice(len(logits), p=_probs(logits, temperature)))
        seq.append(token)
        out.append(token)
        if token == eos:
            break
    return Generation(out, len(prompt), prefill, time.perf_counter() - start)


def generate_speculative(target: OrtDecoder, draft: OrtDecoder, prompt: list[int], max_new: int, k: int,
                         temperature: float = 0.0, seed: int = 0, eos: int | None = None,
                         max_length: int | None = None, adaptive: bool = False) -> Generation:
    _check_request(prompt, max_new, k, max_length, 1 << 62)
    rng = np.random.default_rng(seed)
    greedy = temperature == 0
    prefill = _prefill([target, draft], prompt)
    seq, out = list(prompt), []
    gen = Generation(out, len(prompt), prefill, 0.0)
    start = time.perf_counter()
    while len(out) < max_new:
        steps = min(k, max_new - len(out))  # never propose past the budget
        if max_length:
            steps = max(1, min(steps, max_length - len(seq)))
        proposals, draft_probs = [], []
        for _ in range(steps):
            logits = draft.feed((seq + proposals)[draft.length:])[-1]
            if greedy:
                proposals.append(int(logits.argmax()))
            else:
                q = _probs(logits, temperature)
                proposals.append(int(rng.choice(len(q), p=q)))
                draft_probs.append(q)
        scores = target.feed([seq[-1], *proposals])  # (k+1) rows: for d1..dk and the bonus token
        accepted, token = 0, None
        for i, d in enumerate(proposals):
            if greedy:
                if int(scores[i].argmax()) != d:
                    token = int(scores[i].argmax())
                    break
            else:
                p = _probs(scores[i], temperature)
                q = draft_probs[i]
                if rng.random() >= min(1.0, p[d] / q[d]):
                    residual = np.maximum(p - q, 0.0)
                    token = int(rng.choice(len(p), p=residual / residual.sum()))
                    break
            accepted += 1
        if token is None:  # all accepted: the target's own next token comes free
            last = scores[len(proposals)]
            token = int(last.argmax()) if greedy else int(rng.choice(len(last), p=_probs(last, temperature)))
        new = proposals[:accepted] + [token]
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: max_new - len(out)]
        accepted = min(accepted, len(new))  # proposals cut by EOS or the budget were not used
        seq += new
        out += new
        target.crop(len(seq) - 1)
        draft.crop(min(draft.length, len(seq) - 1))
        gen.rounds += 1
        gen.proposed += len(proposals)
        gen.accepted += accepted
        gen.accepted_per_round.append(accepted)
        gen.k_per_round.append(len(proposals))
        if adaptive:  # lengthen after a clean sweep, shorten after an early miss
            k = min(k + 1, 16) if accepted == len(proposals) else max(1, k - 1) if accepted < len(proposals) // 2 else k
        if eos is not None and out and out[-1] == eos:
            break
    gen.decode_s = time.perf_counter() - start
    return gen


def _walk(scores: np.ndarray, tree, greedy: bool, temperature: float, rng) -> tuple[list[int], int]:
    """The accepted path (tree indices) and the token after it. Greedy: follow the child equal to the target's
    argmax. Sampling: the proposals are deterministic (q = a point mass), so the rejection rule accepts child d
    with probability p(d) and otherwise removes d from p and renormalises (the residual) before trying the next
    child, then samples from what is left: the output follows the target's distribution exactly."""
    node, path = -1, []
    while True:
        row = scores[node + 1]
        kids = tree.children(node)
        if greedy:
            best = int(row.argmax())
            nxt = next((c for c in kids if tree.tokens[c] == best), None)
            if nxt is None:
                return path, best
        else:
            p, nxt = _probs(row, temperature), None
            for c in kids:
                d = tree.tokens[c]
                if rng.random() < p[d]:
                    nxt = c
                    break
                p[d] = 0.0
                p /= p.sum()
            if nxt is None:
                return path, int(rng.choice(len(p), p=p))
        path.append(nxt)
        node = nxt


def generate_draft_free(target: OrtDecoder, prompt: list[int], max_new: int, mode: str = "lookahead",
                        ngram: int = 4, branches: int = 4, tokens: int = 16, temperature: float = 0.0,
                        seed: int = 0, eos: int | None = None, max_length: int | None = None) -> Generation:
    """Lookahead (a token tree from the n-gram trie, one tree-mask call) or prompt lookup (one chain, a plain
    (k+1)-token call): no draft model; every round keeps what the target itself generates."""
    from edgetok.llm.lookahead import Tree, TrieIndex, prompt_lookup

    _check_request(prompt, max_new, 1, max_length, 1 << 62)
    _check_draft_free(ngram, branches, tokens)
    rng = np.random.default_rng(seed)
    greedy = temperature == 0
    prefill = _prefill([target], prompt)
    seq, out = list(prompt), []
    index = TrieIndex(ngram, tokens) if mode == "lookahead" else None
    if index is not None:
        index.extend(seq)
    gen = Generation(out, len(prompt), prefill, 0.0)
    start = time.perf_counter()
    while len(out) < max_new:
        tree = index.draft(branches, tokens) if index is not None else prompt_lookup(seq, ngram, tokens)
        room = min(max_new - len(out), (max_length - len(seq)) if max_length else max_new) - 1  # the bonus too
        keep = [i for i in range(len(tree)) if tree.depth(i) <= room]  # parents come first, so this stays a tree
        tree = Tree([tree.tokens[i] for i in keep], [keep.index(tree.parents[i]) if tree.parents[i] >= 0 else -1
                                                     for i in keep])
        past = target.length
        if tree.is_chain():
            scores = target.feed([seq[-1], *tree.tokens])
        else:
            scores = target.feed_tree(seq[-1], tree.tokens, tree.parents)
        path, token = _walk(scores, tree, greedy, temperature, rng)
        new = [tree.tokens[i] for i in path] + [token]
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: max_new - len(out)]
        accepted = len(new) - 1 if len(new) > len(path) else len(new)
        target.keep(list(range(past + 1)) + [past + 1 + i for i in path[:len(new) - 1]])
        seq += new
        out += new
        if index is not None:
            index.extend(new)
        gen.rounds += 1
        gen.proposed += len(tree)
        gen.accepted += accepted
        gen.accepted_per_round.append(accepted)
        gen.k_per_round.append(len(tree))
        if eos is not None and out and out[-1] == eos:
            break
    gen.decode_s = time.perf_counter() - start
    return gen


def _check_draft_free(ngram: int, branches: int, tokens: int) -> None:
    for name, value in (("--ngram", ngram), ("--branches", branches), ("--tokens", tokens)):
        if value < 1:
            raise EdgetokError(f"{name} {value} must be >= 1")


def encode_prompt(manifest: dict, folder: str, text: str | None, ids: list[int] | None) -> list[int]:
    if (text is None) == (ids is None):
        raise EdgetokError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if ids is not None:
        bad = [t for t in ids if not 0 <= t < manifest["vocab_size"]]
        if bad:
            raise EdgetokError(f"--prompt-ids {bad[0]} is outside the vocabulary 0..{manifest['vocab_size'] - 1}")
        return ids
    if manifest["tokenizer"] is None:
        raise EdgetokError(f"{folder} has no tokenizer (exported from configs only); give --prompt-ids")
    return _tokenizer(folder, manifest)(text, add_special_tokens=False)["input_ids"]


def _tokenizer(folder: str, manifest: dict):
    from transformers import AutoTokenizer

    path = inside(folder, manifest["tokenizer"]["folder"], "tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(path, **hf.LOCAL)
    except Exception as exc:
        raise hf.load_error(path, "the tokenizer", exc) from None


MODES = ("target", "speculative", "lookahead", "prompt-lookup")


def generate(folder: str, prompt: str | None = None, prompt_ids: list[int] | None = None, max_new_tokens: int = 64,
             mode: str = "speculative", k: int = 4, temperature: float = 0.0, seed: int = 0,
             draft_device: str = "cpu", target_device: str = "cpu", adaptive_k: bool = False, ngram: int = 4,
             branches: int = 4, tokens: int = 16, backend: str = "onnxruntime") -> dict:
    """One generation, as `edgetok generate` reports it (JSON-ready)."""
    if mode not in MODES:
        raise EdgetokError(f"--mode {mode!r} is unknown; choose {', '.join(MODES)}")
    _check_draft_free(ngram, branches, tokens)
    if not temperature >= 0 or temperature == float("inf"):
        raise EdgetokError(f"--temperature {temperature} must be a finite number >= 0 (0 is greedy)")
    manifest = read_manifest(folder)
    ids = encode_prompt(manifest, folder, prompt, prompt_ids)
    _check_request(ids, max_new_tokens, k if mode == "speculative" else 1, manifest.get("max_length"),
                   manifest["vocab_size"])
    if mode == "speculative" and not manifest.get("draft"):
        raise EdgetokError(f"{folder} holds a target alone (exported with --draft none); use --mode lookahead, "
                           "prompt-lookup or target")
    manifest, target, draft = open_pair(folder, draft_device, target_device, tree=mode == "lookahead",
                                        backend=backend)
    eos = manifest["special_tokens"].get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if mode == "target":
        gen = generate_target(target, ids, max_new_tokens, temperature, seed, eos, manifest.get("max_length"))
    elif mode == "speculative":
        gen = generate_speculative(target, draft, ids, max_new_tokens, k, temperature, seed, eos,
                                   manifest.get("max_length"), adaptive_k)
    else:
        gen = generate_draft_free(target, ids, max_new_tokens, mode, ngram, branches, tokens, temperature, seed, eos,
                                  manifest.get("max_length"))
    result = {"mode": mode, "backend": backend, "k": k if mode == "speculative" else None, "temperature": temperature,
              "seed": seed,
              "prompt_ids": ids, **gen.as_dict(),
              "devices": {"target": target_device, "draft": draft_device if mode == "speculative" else None},
              "calls": {"target": target.calls, "draft": draft.calls if draft is not None else 0}}
    if mode in ("lookahead", "prompt-lookup"):
        result["draft_free"] = {"ngram": ngram, "branches": branches if mode == "lookahead" else 1, "tokens": tokens}
    if manifest["tokenizer"] is not None:
        result["text"] = _tokenizer(folder, manifest).decode(gen.tokens)
    return result
