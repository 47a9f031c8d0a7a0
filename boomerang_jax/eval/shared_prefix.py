"""Perplexity rows of many models that share layers, with each shared prefix of layers run once.

A family and its baselines are built from the same few dozen layers: every size of the boomerang family is the
student's layers with some blocks swapped for the teacher's, naive pruning and ShortGPT keep subsets of the
teacher's layers. Two models whose first d layers (and embedding) are the same arrays have the same hidden
states after those d layers, so an evaluation keeps the hidden states of the model it evaluated last and runs a
new model only from the first layer where the two differ. Models are visited in the lexicographic order of
their layer sequences (a depth-first walk of the trie of prefixes), which makes the shared part as long as it
can be. Layers are told apart by their content (a hash of their arrays), so sharing never depends on how a
model was put together; one compiled program runs any layer, one more the final norm and LM head.

The rows are those of `perplexity.perplexity_rows` (per-row NLL sums and token counts) up to float rounding:
the layers run one at a time rather than in one loop. Memory: the hidden states along the current path, per
text, [depth + 1] x tokens x hidden_size in the compute dtype, at most `max_state_bytes` (2 GiB): past that, a text's
batches are walked in groups, every model once per group; and one copy of each distinct layer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any, Hashable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.models.batch import BATCH_KEYS
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.logits import chunked_token_nll
from boomerang_jax.models.suffix import embed_tokens, final_norm, run_layers
from boomerang_jax.models.transformer import Params, head_kernel


MAX_STATE_BYTES = 2 << 30  # hidden states kept along the walk's path, per text: more batches are walked in groups


def _digest(*arrays: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for x in arrays:
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def layer_config(config: ModelConfig) -> ModelConfig:
    """The part of a config that one decoder layer depends on (depth and head tying set to fixed values)."""
    return config.replace(num_layers=1, tie_word_embeddings=False)


def head_layer_equivalents(config: ModelConfig) -> float:
    """The LM head's multiply-adds per token in units of one decoder layer's (projections and MLP)."""
    d, attn = config.hidden_size, config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    layer = d * attn + (3 if config.gated_mlp else 2) * d * config.intermediate_size
    return d * config.vocab_size / layer


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _run_layer(layer: Params, config: ModelConfig, hidden: jax.Array, segment_ids: jax.Array,
               positions: jax.Array, dtype: Any) -> jax.Array:
    stack = jax.tree.map(lambda x: x[None], layer)
    h, _ = run_layers(stack, jnp.zeros((1,), jnp.int32), 1, config, hidden, segment_ids=segment_ids,
                      positions=positions, dtype=dtype)
    return h


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _embed(embed: Params, config: ModelConfig, tokens: jax.Array, dtype: Any) -> jax.Array:
    return embed_tokens({"embed": embed}, config, tokens, dtype)


@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def _head_rows(norm: Params, head: jax.Array, config: ModelConfig, hidden: jax.Array, targets: jax.Array,
               loss_mask: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    nll = chunked_token_nll(final_norm(norm, config, hidden), head.astype(jnp.float32), targets, chunk)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


@dataclasses.dataclass(frozen=True)
class Member:
    """One model as the evaluation sees it: content keys of its embedding, layers (in order) and head."""
    ident: Hashable
    embed: str
    layers: tuple[str, ...]
    head: str

    @property
    def path(self) -> tuple[str, ...]:
        return (self.embed,) + self.layers


@dataclasses.dataclass
class _Path:
    """The hidden states (per batch) after each prefix of the last model evaluated on one text."""
    keys: list[str] = dataclasses.field(default_factory=list)
    states: list[list[jax.Array]] = dataclasses.field(default_factory=list)


class SharedPrefixEval:
    """Collect models with `add` (each is fingerprinted and its distinct pieces kept; the caller may drop its
    params), then `run` yields their rows, running each shared prefix of layers once per text. `dtype`: the
    compute dtype of every layer and LM head (models.matmul: float32 accumulation; the NLL in float32)."""

    def __init__(self, texts: Mapping[str, Sequence[Mapping[str, np.ndarray]]], *, chunk: int = 128,
                 max_state_bytes: int = MAX_STATE_BYTES, dtype: Any = jnp.float32) -> None:
        if not texts or any(not batches for batches in texts.values()):
            raise ValueError(f"every text needs at least one evaluation batch, got {list(texts)}")
        self.texts = {t: [{k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in bs] for t, bs in texts.items()}
        self.chunk, self.max_state_bytes, self.dtype = chunk, max_state_bytes, jnp.dtype(dtype)
        self.config: ModelConfig | None = None
        self.members: dict[Hashable, Member] = {}
        self._layers: dict[str, Params] = {}
        self._embeds: dict[str, Params] = {}
        self._heads: dict[str, tuple[Params, jax.Array]] = {}
        self.layers_run = 0  # layer applications (per text, over all its batches; groups counted once) run so far
        self.layers_needed = 0  # what evaluating each model from its embedding would have run

    def add(self, ident: Hashable, config: ModelConfig, params: Params) -> Member:
        """Fingerprint one model (its layers must match the others' architecture) and keep its new pieces."""
        arch = layer_config(config)
        if self.config is None:
            self.config = arch
        elif arch != self.config:
            diff = {f.name for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(self.config, f.name)}
            raise ValueError(f"model {ident!r} has another architecture than the models before it "
                             f"(config fields {sorted(diff)} differ); evaluate it on its own")
        if ident in self.members:
            raise ValueError(f"model {ident!r} was added twice")
        leaves = jax.tree.leaves(params["layers"])
        count = {int(x.shape[0]) for x in leaves}
        if count != {config.num_layers}:
            raise ValueError(f"model {ident!r}: its layer stack holds {sorted(count)} layers, its config "
                             f"{config.num_layers}")
        keys = []
        for i in range(config.num_layers):
            key = _digest(*(x[i] for x in leaves))
            if key not in self._layers:
                self._layers[key] = jax.tree.map(lambda x: jnp.asarray(x[i]), params["layers"])
            keys.append(key)
        embed = _digest(params["embed"]["embedding"])
        self._embeds.setdefault(embed, {"embedding": jnp.asarray(params["embed"]["embedding"])})
        norm_leaves = jax.tree.leaves(params["final_norm"])
        kernel = head_kernel(params, config)
        head = _digest(kernel, *norm_leaves)
        if head not in self._heads:
            self._heads[head] = (jax.tree.map(jnp.asarray, params["final_norm"]), jnp.asarray(kernel))
        member = Member(ident, embed, tuple(keys), head)
        self.members[ident] = member
        return member

    @property
    def distinct_layers(self) -> int:
        return len(self._layers)

    def _states(self, path: _Path, member: Member, batches: list[dict[str, jax.Array]], count: bool = True
                ) -> list[jax.Array]:
        want = member.path
        keep = 0
        while keep < min(len(path.keys), len(want)) and path.keys[keep] == want[keep]:
            keep += 1
        del path.keys[keep:], path.states[keep:]
        assert self.config is not None
        for d in range(keep, len(want)):
            if d == 0:
                states = [_embed(self._embeds[member.embed], self.config, b["tokens"], self.dtype) for b in batches]
            else:
                layer = self._layers[want[d]]
                states = [_run_layer(layer, self.config, h, b["segment_ids"], b["positions"], self.dtype)
                          for h, b in zip(path.states[-1], batches)]
                self.layers_run += count
            path.keys.append(want[d])
            path.states.append(states)
        self.layers_needed += len(member.layers) * count
        return path.states[-1]

    def plan_cost(self, todo: Mapping[Hashable, Sequence[str]]) -> dict[str, Any]:
        """What `run(todo)` will cost before it runs: layer passes run (`run`, one per distinct prefix and
        text) and needed one model at a time (`needed`), and `share`, the expected fraction of the time without
        sharing (the final norm and LM head of every evaluation counted as `head_layer_equivalents` layers)."""
        nodes: set[tuple[str, tuple[str, ...]]] = set()
        needed = evals = 0
        for ident, texts in todo.items():
            m = self.members[ident]
            for text in texts:
                nodes |= {(text, m.path[:d]) for d in range(2, len(m.path) + 1)}
                needed += len(m.layers)
                evals += 1
        head = head_layer_equivalents(self.config) * evals if self.config else 0.0
        return {"run": len(nodes), "needed": needed, "share": (len(nodes) + head) / max(needed + head, 1e-9)}

    def run(self, todo: Mapping[Hashable, Sequence[str]]) -> Iterator[tuple[Hashable, str, np.ndarray, np.ndarray,
                                                                             float]]:
        """For each (model, text) of `todo` (idents as given to `add`): (ident, text, per-row NLL sums, per-row
        token counts, seconds spent on it), the rows holding tokens only, as `perplexity_rows` returns them."""
        unknown = [i for i in todo if i not in self.members]
        if unknown:
            raise KeyError(f"models never added: {unknown}")
        bad = sorted({t for ts in todo.values() for t in ts if t not in self.texts})
        if bad:
            raise KeyError(f"texts {bad} are not among the evaluation texts {sorted(self.texts)}")
        if not todo:
            return
        assert self.config is not None
        members = sorted((self.members[i] for i in todo), key=lambda m: m.path)
        groups = self._groups(max(len(m.path) for m in members))
        sums: dict[tuple[Hashable, str], list[np.ndarray]] = {}
        counts: dict[tuple[Hashable, str], list[np.ndarray]] = {}
        seconds: dict[tuple[Hashable, str], float] = {}
        for g in range(max(map(len, groups.values()))):
            paths = {t: _Path() for t in self.texts}  # the hidden states of one group of batches per text
            for member in members:
                for text in todo[member.ident]:
                    if g >= len(groups[text]):
                        continue
                    key, start = (member.ident, text), time.perf_counter()
                    batches = groups[text][g]
                    norm, head = self._heads[member.head]
                    for h, b in zip(self._states(paths[text], member, batches, count=g == 0), batches):
                        s, n = _head_rows(norm, head, self.config, h, b["targets"], b["loss_mask"],
                                          chunk=self.chunk)
                        sums.setdefault(key, []).append(np.asarray(s, np.float64))
                        counts.setdefault(key, []).append(np.asarray(n, np.float64))
                    seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
                    if g == len(groups[text]) - 1:
                        s, n = np.concatenate(sums.pop(key)), np.concatenate(counts.pop(key))
                        keep = n > 0
                        yield member.ident, text, s[keep], n[keep], seconds.pop(key)

    def _groups(self, depth: int) -> dict[str, list[list[dict[str, jax.Array]]]]:
        """Each text's batches in consecutive groups whose hidden states along a path of `depth` prefixes fit in
        `max_state_bytes` (one group per text when they all fit, as in the demo)."""
        assert self.config is not None
        out = {}
        for text, batches in self.texts.items():
            per_batch = max(b["tokens"].size for b in batches) * self.config.hidden_size * self.dtype.itemsize * depth
            size = max(1, self.max_state_bytes // per_batch)
            out[text] = [batches[i:i + size] for i in range(0, len(batches), size)]
        return out
