"""The analytic model: bytes per rank of each category, from the model's shape and the run's settings.

`predict` writes the formulas out (its docstring gives each with its source); `ModelShape` reads
the sizes they use off a meta-device build of the model, `Workload` holds the run's settings.
Each category is also placed: on the device, or in host memory when fsdp.cpu_offload moves the
model state and AdamW there (places.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from batch import BatchGeometry
from fsdp.activation import checkpointed_layers
from fsdp.build import BuildSettings
from fsdp.memory.places import by_place, whole
from fsdp.model import build_model, find_decoder_layer_names
from fsdp.precision import get_precision


@dataclass(frozen=True)
class Workload:
    """What the analytic model needs to know about a run, besides the model.

    `world_size` counts every rank; with HSDP (`replicate` > 1) the model state is sharded over
    the world_size / replicate ranks of a shard group, and each of the `replicate` groups holds a
    whole copy of it.
    """

    world_size: int
    precision: str = "mixed"
    checkpointing: str = "none"  # fsdp/activation.py MODES: none | selective | every_k | full
    every_k: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    chunk_tokens: int = 1024  # loss.chunk_tokens
    grad_accum_steps: int = 1
    reduce_grads_every_microbatch: bool = False
    reshard_after_forward: bool = True
    reduce_dtype: str | None = None  # fsdp.reduce_dtype; None: the precision's own
    split_root: bool = False  # fsdp.split_root
    device: str = "cuda"  # cpu | cuda: the one kernel whose memory differs (see reduce-scatter buffers)
    optim_impl: str = "loop"  # optim.impl, fsdp/adamw.py IMPLS: loop | foreach | fused
    replicate: int = 1  # fsdp.replicate, resolved: HSDP's replicas (1: plain FSDP)
    cpu_offload: bool = False  # fsdp.cpu_offload: model state and AdamW in host memory
    activation_offload: bool = (
        False  # activation_checkpointing.offload: the layers' saved tensors in host memory
    )
    state_dtype: str | None = None  # optim.state_dtype: AdamW's m and v; None: the parameters' dtype
    decay_embeddings: bool = False  # optim.decay_embeddings: the input embeddings in the decayed group

    def __post_init__(self) -> None:
        if self.replicate < 1 or self.world_size % self.replicate:
            raise ValueError(f"{self.replicate} replicas do not divide {self.world_size} ranks")

    @property
    def shard_size(self) -> int:
        """Ranks of a shard group: each holds 1/shard_size of the model state."""
        return self.world_size // self.replicate

    @property
    def mesh_label(self) -> str:
        """The mesh in a word: 1-D, or HSDP's replicas x shards (2x8)."""
        return "1-D" if self.replicate == 1 else f"{self.replicate}x{self.shard_size}"

    def describe_mesh(self) -> str:
        """What each rank holds on this mesh (fsdp.dist.Dist.describe_mesh says it of a live one)."""
        if self.replicate == 1:
            return f"1-D: every rank holds 1/{self.world_size} of the model state"
        return (
            f"{self.mesh_label}: HSDP, {self.replicate} replicas of {self.shard_size} shards; every rank holds "
            f"1/{self.shard_size} of the model state, its gradient shard all-reduced across the replicas"
        )

    @classmethod
    def of(
        cls,
        build: BuildSettings,
        geometry: BatchGeometry,
        *,
        reduce_grads_every_microbatch: bool = False,
        device: str = "cuda",
        optim_impl: str = "loop",
        replicate: int = 1,
        state_dtype: str | None = None,
        decay_embeddings: bool = False,
    ) -> Workload:
        """A run's workload from how its model is built, how its batches are shaped, and its
        replicate degree (fsdp.replicate, resolved by fsdp.dist.replicate_degree)."""
        return cls(
            world_size=geometry.world_size,
            precision=build.precision,
            checkpointing=build.checkpointing,
            every_k=build.every_k,
            micro_batch_size=geometry.micro_batch_size,
            seq_len=geometry.max_seq_length,
            chunk_tokens=build.chunk_tokens,
            grad_accum_steps=geometry.grad_accum_steps,
            reduce_grads_every_microbatch=reduce_grads_every_microbatch,
            reshard_after_forward=build.reshard_after_forward,
            reduce_dtype=build.reduce_dtype,
            split_root=build.split_root,
            device=device,
            optim_impl=optim_impl,
            replicate=replicate,
            cpu_offload=build.cpu_offload,
            activation_offload=build.activation_offload,
            state_dtype=state_dtype,
            decay_embeddings=decay_embeddings,
        )

    @property
    def build(self) -> BuildSettings:
        """The build settings of this workload, to build the model it describes (fsdp/build.py)."""
        return BuildSettings(
            precision=self.precision,
            checkpointing=self.checkpointing,
            every_k=self.every_k,
            reshard_after_forward=self.reshard_after_forward,
            cpu_offload=self.cpu_offload,
            chunk_tokens=self.chunk_tokens,
            reduce_dtype=self.reduce_dtype,
            split_root=self.split_root,
            activation_offload=self.activation_offload,
        )


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formulas use, read off a meta-device build of the HF model (no memory)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # every unique parameter, by qualified name
    layer_prefixes: tuple[str, ...]  # the decoder layers' qualified names
    buffer_bytes: int

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        model = build_model(config, torch.float32, on_meta=True)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            param_shapes=tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
            layer_prefixes=tuple(name + "." for name in find_decoder_layer_names(model)),
            buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        )

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for _, s in self.param_shapes)

    def unit_shapes(self) -> list[list[tuple[int, ...]]]:
        """Parameter shapes per FSDP unit: the root's (embeddings, final norm, head) first, then each layer's."""
        units: dict[str, list] = {"": []}
        for name, shape in self.param_shapes:
            prefix = next((p for p in self.layer_prefixes if name.startswith(p)), "")
            units.setdefault(prefix, []).append(shape)
        return list(units.values())


def sharded_numel(shapes: list[tuple[int, ...]], world_size: int) -> int:
    """Elements each rank stores: FSDP pads dim 0 up to a multiple of the world size, ceil(d0 / N) rows each."""
    return sum(-(-s[0] // world_size) * math.prod(s[1:]) for s in shapes)


def optimizer_step_numel(
    shape: ModelShape, world_size: int, impl: str, *, decay_embeddings: bool = False
) -> int:
    """Elements of temporaries AdamW's step (fsdp/adamw.py) holds at once on each rank, by optim.impl.

    loop: one denominator, the largest parameter's shard. foreach: the denominators of a whole
    parameter group, the larger of fsdp.adamw.param_groups' two (matrices; vectors and the input
    embedding, taken as the first vocab x hidden matrix, as in HF's parameter order, unless
    `decay_embeddings` puts it with the matrices). fused: none, the kernel keeps each element's
    denominator in registers.
    """
    shapes = [s for _, s in shape.param_shapes]
    if impl == "loop":
        return max(sharded_numel([s], world_size) for s in shapes)
    if impl == "fused":
        return 0
    if impl != "foreach":
        raise ValueError(f"optim.impl={impl!r}: expected loop, foreach or fused")
    embedding = None
    if not decay_embeddings:
        embedding = next((i for i, s in enumerate(shapes) if s == (shape.vocab, shape.hidden)), None)
    no_decay = [s for i, s in enumerate(shapes) if len(s) < 2 or i == embedding]
    decay = [s for i, s in enumerate(shapes) if len(s) >= 2 and i != embedding]
    return max(sharded_numel(decay, world_size), sharded_numel(no_decay, world_size))


@dataclass(frozen=True)
class ActivationSplit:
    """Bytes per token of what the layers save, by place (activation offloading: predict's
    docstring): `host` on the host, of which `host_last` the last layer's; `kept` on the device;
    `now` the running layer's working set on the device, `back` what backward brings back at once,
    `pending` what the last layer has yet to save when its working set peaks (a plain layer's SwiGLU
    product). Without offloading nothing is on the host and nothing is brought back."""

    offload: bool
    host: int
    host_last: int
    kept: int
    now: int
    back: int
    pending: int = 0

    @classmethod
    def of(
        cls,
        shape: ModelShape,
        workload: Workload,
        *,
        compute_bytes: int,
        a_layer: int,
        saved: int,
        running: int,
    ) -> ActivationSplit:
        # predict's notation: c the compute dtype's bytes, h the hidden size, hd the head dim.
        c, h, hd = compute_bytes, shape.hidden, shape.head_dim
        ckpt = checkpointed_layers(shape.layers, workload.checkpointing, workload.every_k)
        now = running + 2 * c * h + 2 * c * hd
        if not workload.activation_offload:
            return cls(offload=False, host=0, host_last=0, kept=saved, now=now, back=0)
        plain = shape.layers - len(ckpt)
        hq, hkv = shape.heads * hd, shape.kv_heads * hd
        widest = max(2 * c * shape.intermediate, c * (2 * hq + 2 * hkv) + 4 * shape.heads) if plain else c * h
        host = len(ckpt) * c * h + plain * a_layer
        host_last = c * h if shape.layers - 1 in ckpt else a_layer
        return cls(
            offload=True,
            host=host,
            host_last=host_last,
            kept=saved - host,
            now=now,
            back=widest + 2 * c * hd,
            pending=0 if shape.layers - 1 in ckpt else c * shape.intermediate,
        )

    def split(self, host: int, device: int) -> int | dict[str, int]:
        """Activations' bytes: per place when offloaded (places.py), else one number."""
        return {"host": host, "device": device} if self.offload else host + device

    def category(self, tokens: int, activations: int, a_root: int) -> int | dict[str, int]:
        """The category's own peak: `activations` as predicted without offloading; offloaded, per place."""
        if not self.offload:
            return activations
        return self.split(tokens * self.host, tokens * (self.kept + max(a_root, self.now, self.back)))


def largest_param(shapes: list[tuple[int, ...]]) -> int:
    """Elements of the largest of these parameters."""
    return max(math.prod(s) for s in shapes)


@dataclass(frozen=True)
class UnitSizes:
    """Elements of the FSDP units, each padded to the shard group: `root` the unit kept gathered
    from its forward to its backward (the root: embeddings, final norm, head; under split_root on
    an untied model, the final norm + head group), `embeddings` the embeddings' own unit (split
    only, else 0), `layer` the largest decoder layer, `total` all of them.

    Split, no two of the root group, the embeddings and a layer are ever gathered together: each
    unit is resharded before the next is unsharded (its successor's all-gather, prefetched, is
    all-gather buffers until then), and the head's gradients are reduced before any layer's."""

    root: int
    embeddings: int
    layer: int
    total: int
    split: bool

    @classmethod
    def of(cls, shape: ModelShape, world_size: int, *, split_root: bool) -> UnitSizes:
        padded = [sharded_numel(u, world_size) * world_size for u in shape.unit_shapes()]
        layer, total = max(padded[1:], default=0), sum(padded)
        if not (split_root and not shape.tied):
            return cls(root=padded[0], embeddings=0, layer=layer, total=total, split=False)
        embeddings = sharded_numel([(shape.vocab, shape.hidden)], world_size) * world_size
        return cls(root=padded[0] - embeddings, embeddings=embeddings, layer=layer, total=total, split=True)

    @property
    def largest_root_part(self) -> int:
        """The largest unit of the root's parameters: the root, or the larger of its two parts."""
        return max(self.root, self.embeddings)

    def gathered_with_a_layer(self, untied_head: int) -> int:
        """Elements gathered, or of fresh gradients, at a layer's worst moment: beside the root (and
        an untied head's fresh gradient), or split, the largest unit alone."""
        if self.split:
            return max(self.largest_root_part, self.layer)
        return self.layer + untied_head

    def shard_copy(self, storage_bytes: int, shard_size: int) -> int:
        """Bytes of the largest unit's shard, copied to the device for its all-gather under
        fsdp.cpu_offload (the shards live in host memory)."""
        return storage_bytes * max(self.largest_root_part, self.layer) // shard_size

    def alone_buffers(self, units: list[list[tuple[int, ...]]], *, cast: bool) -> int:
        """All-gather buffers alone (N = 1), elements: FSDP gathers nothing, but still copies a unit
        into its flat buffer, and casting to the compute dtype makes a copy of one parameter more."""
        root = self.largest_root_part + (largest_param(units[0]) if cast else 0)
        layer = self.layer + (max((largest_param(u) for u in units[1:]), default=0) if cast else 0)
        return max(root, layer)

    def unsharded_grads(
        self, *, compute_bytes: int, reduce_bytes: int, accumulating: bool, tied: bool, head: int
    ) -> int:
        """Bytes of unsharded gradients at their peak. Accumulating without reducing, FSDP keeps each
        whole gradient: upcast to the reduce dtype when it differs from the compute dtype (mixed:
        fp32, beside each micro-batch's fresh bf16 gradients of one unit; tied, the one weight's
        fresh gradient is the root's whole unit), else in the parameter's own .grad. `head`: an
        untied output head's elements, whose fresh gradient waits beside the layers'."""
        c, r = compute_bytes, reduce_bytes
        if not accumulating:
            return c * max(self.root, self.gathered_with_a_layer(head))
        if r != c:
            return r * self.total + c * max(self.root if tied else 0, self.gathered_with_a_layer(head))
        return c * self.total

    def gather_buffers(self) -> int:
        """All-gather buffers, elements: a unit's flat output and its copy-out, and in backward the
        next unit's flat output, prefetched."""
        if self.split:
            return max(2 * self.largest_root_part + self.layer, 3 * self.layer)
        return max(2 * self.root, 3 * self.layer)


@dataclass(frozen=True)
class Gathered:
    """Bytes of unsharded parameters (and of the all-gather buffers beside them) at the phase peaks'
    moments. Resharded after forward: the root, and the running layer beside it; under split_root
    (untied), one unit at a time. Kept gathered (fsdp.reshard_after_forward=false): every unit
    from its forward until its own backward has reduced its gradients, so all of them from the end
    of the forward, one unit fewer after each backward. A unit's flat all-gather output outlives
    its copy-out until the next unit's gather: at the end of the forward, the last unit's. Alone
    (N = 1) no output outlives its copy: the moments hold no all-gather buffers."""

    forward: int  # the end of the forward, and the loss's backward
    running: int  # the last layer's forward (offloaded) and backward
    after_last: int  # the next layer's backward, the last layer's gradients reduced
    start: int  # the first layer's gather, at a micro-batch's start (and as much in its buffers)
    last_buffer: int  # the all-gather output of the forward's last unit, at the end of the forward

    @classmethod
    def of(
        cls, sizes: UnitSizes, *, last_layer: int, compute_bytes: int, reshard_after_forward: bool
    ) -> Gathered:
        """`last_layer`: the last decoder layer's gathered elements, the first unit to reshard in backward."""
        c = compute_bytes
        start = c * sizes.largest_root_part if sizes.split else c * (sizes.root + sizes.layer)
        last_buffer = c * (sizes.root if sizes.split else sizes.layer)
        if not reshard_after_forward:
            return cls(c * sizes.total, c * sizes.total, c * (sizes.total - last_layer), start, last_buffer)
        beside_a_layer = c * sizes.layer if sizes.split else c * (sizes.root + sizes.layer)
        return cls(c * sizes.root, beside_a_layer, beside_a_layer, start, last_buffer)


def predict(shape: ModelShape, w: Workload) -> dict:
    """Bytes per rank of each category (its own peak over a step) and of each phase's peak, in all
    and per place (host, device).

    Notation: N ranks of a shard group (the world size; with HSDP's R replicas, world size / R:
    every tensor below is sharded over N and gathered from N); T = micro_batch x seq tokens per
    forward; C = min(chunk_tokens, T) tokens per logits slice; h hidden, I intermediate,
    hq = heads x head_dim, hkv = kv_heads x head_dim, V vocabulary, L layers; p, c, r bytes of
    the parameter, compute and reduce dtypes (mixed: 4, 2, 4; bf16: 2, 2, 2; fp32: 4, 4, 4;
    fsdp/precision.py). P_u is a unit's parameter count, padded to N.

    Model state (ZeRO paper, Rajbhandari et al. 2020, sec. 3.1: 16 bytes/param for mixed-precision
    Adam, here divided by N because every tensor is sharded):
      sharded params  = p * sum_params ceil(d0/N) * (other dims)
      sharded grads   = p * the same (the reduce-scatter output, cast to the parameter dtype)
      optimizer state = 2s * the same + 4 bytes of step counter per parameter tensor, s the bytes
                        of AdamW's m and v: p, or 2 with optim.state_dtype=bf16
    Gathered state (FSDP2, one unit per decoder layer plus the root; the root's parameters stay
    gathered from its forward to its backward):
      unsharded params   = c * (P_root + P_layer)            (reshard_after_forward=false: c * P, and
                           in every phase peak from the end of the forward to the last backward)
      unsharded grads    = c * max(P_root, P_layer + untied head); when micro-batches accumulate
                           unreduced, FSDP keeps every whole gradient, upcast to r: r * P, plus
                           c * (P_layer + untied head) of the micro-batch's fresh gradients
                           (bf16, fp32: no upcast, the .grad itself accumulates: c * P)
      all-gather buffers = c * max(2 P_root, 3 P_layer)      flat output + its copy-out, and in
                           backward the next layer's flat output, prefetched (N > 1 only)
      reduce-scatter buffers = r * max(P_root, P_layer) * (1 + 1/N): the flat input and this
                           rank's output (N > 1 only); on CPU + r * P_u more: ATen's CPU kernel
                           for the copy-in (_chunk_cat) upcasts the gradients to r first, where
                           the CUDA kernel (and the fake one) writes into the flat input directly;
                           with r != p + p * P_u/N: the output's cast to p (the new sharded
                           gradient) is made while the output is alive.
                           HSDP (R > 1): each unit's reduce-scatter output (r P_u/N) is then
                           all-reduced across the R replicas in place (FSDP2's foreach_reduce: no
                           buffer of its own), and FSDP2 holds it until the end of backward
                           (AllReduceState, so the next reduce-scatter cannot reuse it mid-flight).
                           With r = p it is the sharded gradient itself: nothing more. With r != p
                           (fsdp.reduce_dtype below the storage dtype) every unit's output stays
                           beside its cast to p: r * (P_root + s) or r * (P_layer + s - s_root) in
                           place of r * P_u (1 + 1/N), s = sum_params ceil(d0/N) * (other dims),
                           the root reduced last (and r * s_last more beside a layer's backward)
      cpu_offload: all-gather buffers + p * max(P_root, P_layer) / N, the unit's shards copied to
                           the device before the gather (FSDPParam.all_gather_inputs)
    Activations, per token of a Llama-style layer, as the HF code saves them (Korthikanti et al.
    2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4.1, redone for
    RMSNorm, SwiGLU, grouped-query attention, a fused attention kernel and no dropout):
      A_layer = 2 x RMSNorm (4h fp32 input + 4 rsqrt + 2ch normalized and scaled)
              + c (hq + 2 hkv) query, key, value + 4 heads (softmax statistics) + c hq output
              + 4 c I (gate, SiLU, up, their product)
      A_root  = final RMSNorm (4h + 4 + 2ch) + its fp32 temporary (4h + 4) + rotary cos, sin (2 c hd)
      no checkpointing: T (L A_layer + A_root)
      checkpointed layers keep only their input, c h each, and a checkpointed layer's forward
      holds T (3 c I + 2 c h + 2 c hd) while it runs; in backward the recomputed layer is counted
      under temporaries.
      selective (every layer, op by op: fsdp/activation.py SAVED_OPS) keeps, per layer,
      S_layer = c h input + c (hq + 2 hkv) query, key, value projections + c hq + 4 heads
              attention output and statistics + c h output projection + 2 c I gate and up
              + c h down projection
      (every projection's output, whether its backward needs it or not: the query and key before
      rotary, the output and down projections; none of the norms, rotary, SiLU or product); the
      last layer's forward holds T (c h + 2 c I + 2 c hd)
      more at its SiLU x up, before its down projection: T (L S_layer + max(A_root, that)). In
      backward it recomputes A_layer less what it kept, T (A_layer - c (hkv + hq) - 4 heads
      - 2 c I), counted under temporaries. The attention op differs by device (CPU:
      flash_attention_for_cpu; CUDA: flash, efficient or cudnn) but keeps the same bytes per
      token, its output and an fp32 log-sum-exp per head and position (their meta kernels say
      so; the efficient kernel pads the positions to a multiple of 32, and CUDA's keep 16 to 24
      bytes of RNG state per layer): the formula holds on both. It assumes a fused kernel: SDPA's
      math fallback computes attention with bmm, whose T x T scores per head the policy keeps.
    Activation offloading (activation_checkpointing.offload, fsdp/offload.py): what the layers save
    through autograd's hooks goes to the host, each storage once: a plain layer's A_layer, a
    checkpointed layer's input c h (what the checkpoint saves); selective's kept outputs stay on
    the device (S_layer - c h each: they are the checkpoint's own cache, not saved tensors), and so
    does A_root (the root is not offloaded). Measured on the ledger, the device then holds
      forward:  T (kept + A_now + 2 c h + 2 c hd), A_now the running layer's working set, as the
                checkpointed layer's above (3 c I + 2 c h; selective c h + 2 c I), the 2 c h the
                embeddings' output (held by the decoder's forward) and the layer's input (its
                residual), kept = L (S_layer - c h) under selective, else 0;
                or T (kept + A_root) at the end of the forward, whichever is larger;
      backward: T (kept + U + 2 c hd), U what is brought back for the node that runs: the wider
                of SwiGLU's product (its two inputs, 2 c I) and attention (c (2 hq + 2 hkv) + 4
                heads) for a plain layer, the input c h for a checkpointed one;
      host:     T (L_plain A_layer + L_ckpt c h), at the end of the forward and into backward.
    Every offloaded byte crosses between host and device twice a micro-batch (out in forward,
    back in backward): "activation copies" = 2 x host activations x micro-batches per step.
    Logits (fsdp/loss.py: one slice of C tokens at a time, recomputed in backward):
      12 C V: the slice's fp32 log-softmax, its gradient and the fp32 logits' gradient.
    Temporaries, the largest of: the loss backward (3 c V h: two slices' output-head gradients
    and their sum, + c h (T + C) hidden-state gradients; the sum is made once the slices' logits
    are freed: while a slice's logits backward runs, 12 C V of logits beside one head gradient
    c V h + c h T); the final norm's backward (5 x 4 h T
    fp32, + 2 c V h of head gradient with tied embeddings, + c P_layer of the layer gathered
    ahead);
    a layer's backward (T (2 c h + 2 c I), + T A_layer when it is recomputed); the optimizer
    step (p x what optim.impl holds at once: loop, the largest shard, its one denominator;
    foreach, the shards of a whole parameter group; fused, nothing: optimizer_step_numel; twice
    that when s < p: the update runs on copies of m and v in the parameters' dtype, the copy of v
    then the denominator; fused refuses s < p).
    Places: with fsdp.cpu_offload the sharded params, sharded grads, optimizer state and the
    optimizer step's temporaries are in host memory (FSDP2's CPUOffloadPolicy; AdamW steps there),
    every other category on the device; without it, everything is on the device. Activation
    offloading splits the activations between the two, as above. "host" and "device" each hold
    their categories, phase peaks and peak (places.py).
    """
    n = w.shard_size
    mode = get_precision(w.precision, w.reduce_dtype, w.state_dtype)
    p, c, r, s = mode.storage_bytes, mode.compute_bytes, mode.reduce_bytes, mode.state_bytes
    h, inter, hd, vocab = shape.hidden, shape.intermediate, shape.head_dim, shape.vocab
    hq, hkv = shape.heads * hd, shape.kv_heads * hd
    tokens = w.micro_batch_size * w.seq_len
    chunk = min(w.chunk_tokens, tokens) if w.chunk_tokens > 0 else tokens

    units = shape.unit_shapes()
    all_shapes = [s for u in units for s in u]
    sizes = UnitSizes.of(shape, n, split_root=w.split_root)  # gathered sizes, padding included
    p_root, p_layer, p_total = sizes.root, sizes.layer, sizes.total
    head = 0 if shape.tied else vocab * h
    local = sharded_numel(all_shapes, n)
    local_root = sharded_numel(units[0], n)
    # HSDP with a reduce dtype unlike the storage's: every unit's all-reduced output is held to the
    # end of backward, beside the sharded gradient cast from it (see the docstring).
    held = w.replicate > 1 and r != p
    copy_in = 1 + (w.device == "cpu" and n > 1)  # the flat input, and ATen's CPU upcast of it
    cast = p if r != p else 0  # the output cast to the storage dtype, made while it is alive

    def reducing(p_unit: int, outputs: int) -> int:
        """Bytes while a unit of p_unit elements is reduced, `outputs` output elements alive."""
        return r * (p_unit * copy_in + outputs) + cast * p_unit // n

    if held:  # the root reduced last, every unit's output held; or the first layer, every layer's
        reduce_scatter = max(reducing(p_root, local), reducing(p_layer, local - local_root))
    else:
        reduce_scatter = max(
            reducing(sizes.largest_root_part, sizes.largest_root_part // n), reducing(p_layer, p_layer // n)
        )

    a_norm = 4 * h + 4 + 2 * c * h
    a_layer = 2 * a_norm + c * (hq + 2 * hkv) + 4 * shape.heads + c * hq + 4 * c * inter
    a_root = a_norm + 4 * h + 4 + 2 * c * hd
    ckpt = checkpointed_layers(shape.layers, w.checkpointing, w.every_k)
    n_ckpt = len(ckpt)
    selective = w.checkpointing == "selective"
    # What selective keeps of A_layer, and need not recompute: value, attention, gate and up.
    kept_of_a_layer = c * (hkv + hq) + 4 * shape.heads + 2 * c * inter
    kept = c * h + c * (hq + 2 * hkv) + 4 * shape.heads + c * hq + c * h + 2 * c * inter + c * h
    per_ckpt = kept if selective else c * h
    saved = n_ckpt * per_ckpt + (shape.layers - n_ckpt) * a_layer
    saved_last = per_ckpt if shape.layers - 1 in ckpt else a_layer  # freed by its backward
    activations = tokens * (saved + a_root)
    running = c * h + 2 * c * inter if selective else 3 * c * inter + 2 * c * h
    if n_ckpt:  # the last checkpointed layer's forward, beside what it and the layers before it saved
        through_last = sum(per_ckpt if i in ckpt else a_layer for i in range(max(ckpt) + 1))
        activations = max(activations, tokens * (through_last + running + 2 * c * hd))
    a = ActivationSplit.of(shape, w, compute_bytes=c, a_layer=a_layer, saved=saved, running=running)

    accumulating = w.grad_accum_steps > 1 and not w.reduce_grads_every_microbatch
    cats = {
        "sharded params": p * local,
        "unsharded params": c
        * (p_total if not w.reshard_after_forward else sizes.gathered_with_a_layer(p_root)),
        "sharded grads": p * local,
        "unsharded grads": sizes.unsharded_grads(
            compute_bytes=c, reduce_bytes=r, accumulating=accumulating, tied=shape.tied, head=head
        ),
        "optimizer state": 2 * s * local + 4 * len(all_shapes),
        "activations": whole(a.category(tokens, activations, a_root)),
        "logits": 12 * chunk * vocab,
        "all-gather buffers": c
        * (sizes.gather_buffers() if n > 1 else sizes.alone_buffers(units, cast=p != c))
        + (sizes.shard_copy(p, n) if w.cpu_offload else 0),
        "reduce-scatter buffers": reduce_scatter,
        "temporaries": 0,
        "inputs": 2 * 8 * tokens * w.grad_accum_steps,  # ids and labels (int64) of every micro-batch
        "buffers": shape.buffer_bytes,
    }
    recomputed = (a_layer - kept_of_a_layer if selective else a_layer) if n_ckpt else 0
    layer_bw = tokens * (2 * c * h + 2 * c * inter + recomputed)
    temporaries = {
        # One slice's head gradient, or (several slices) two slices' and their sum.
        "loss backward": (3 if tokens > chunk else 1) * c * vocab * h + c * h * (tokens + chunk),
        "final norm backward": 5 * 4 * h * tokens + (2 * c * vocab * h if shape.tied else 0) + c * p_layer,
        "layer backward": layer_bw + (c * vocab * h if shape.tied else 0),
        "optimizer step": p
        * optimizer_step_numel(shape, n, w.optim_impl, decay_embeddings=w.decay_embeddings)
        * (2 if s < p else 1),
    }
    cats["temporaries"] = max(temporaries.values())

    # Phase peaks: what is alive together at each phase's worst moments, category by category.
    state = {k: cats[k] for k in ("sharded params", "optimizer state", "inputs", "buffers")}
    accumulated = r * p_total if accumulating else 0
    # Reducing every micro-batch, each forward after the first runs beside the sharded gradients
    # the earlier micro-batches accumulated (the backward's moments already hold theirs).
    reduced_so_far = p * local if w.grad_accum_steps > 1 and w.reduce_grads_every_microbatch else 0
    gathered = Gathered.of(
        sizes,
        last_layer=sharded_numel(units[-1], n) * n,
        compute_bytes=c,
        reshard_after_forward=w.reshard_after_forward,
    )
    moments = {
        "forward": [
            {  # a micro-batch's start: the first units gathered, their all-gather outputs alive
                **state,
                "unsharded grads": accumulated,
                "sharded grads": reduced_so_far,
                "unsharded params": gathered.start,
                "all-gather buffers": gathered.start if n > 1 else 0,
            },
            {  # the end of the forward: every layer's activations, the first logits slice
                **state,
                "unsharded grads": accumulated,
                "sharded grads": reduced_so_far,
                "unsharded params": gathered.forward,
                "all-gather buffers": gathered.last_buffer if n > 1 else 0,
                "activations": a.split(tokens * a.host, tokens * (a.kept + a_root)),
                "logits": 8 * chunk * vocab,
            },
            *(
                [  # offloaded, the last layer's forward: its working set on the device, all it
                    # saves on the host but its SwiGLU product (a plain layer's), not yet made
                    {
                        **state,
                        "unsharded grads": accumulated,
                        "sharded grads": reduced_so_far,
                        "unsharded params": gathered.running,
                        "activations": a.split(tokens * (a.host - a.pending), tokens * (a.kept + a.now)),
                    }
                ]
                if a.offload
                else []
            ),
        ],
        "backward": [
            {  # a logits slice's backward: its fp32 logits and their gradients, one head gradient
                **state,
                "unsharded grads": accumulated,
                "unsharded params": gathered.forward,
                "sharded grads": reduced_so_far,
                "activations": a.split(tokens * a.host, tokens * (a.kept + a_root)),
                "logits": cats["logits"],
                "temporaries": c * vocab * h + c * h * tokens,
            },
            {  # the slices' head gradients summed, their logits freed
                **state,
                "unsharded grads": accumulated,
                "unsharded params": gathered.forward,
                "sharded grads": reduced_so_far,
                "activations": a.split(tokens * a.host, tokens * (a.kept + a_root)),
                "temporaries": temporaries["loss backward"],
            },
            {  # the root's gradients copied into its reduce-scatter input, the root resharded
                **state,
                "sharded grads": reduced_so_far or p * (local - local_root),
                "unsharded grads": c * sizes.largest_root_part,
                "reduce-scatter buffers": r * sizes.largest_root_part * copy_in,
            },
            {  # the root's reduce-scatter, the last: its output beside the input (measured: one
                # fresh gradient, the root's largest, still alive)
                **state,
                "sharded grads": reduced_so_far or p * (local - local_root),
                "unsharded grads": c * largest_param(units[0]),
                "reduce-scatter buffers": cats["reduce-scatter buffers"],
            },
            {  # the root reduced: every sharded gradient, gradient clipping (before the optimizer step)
                **state,
                "sharded grads": cats["sharded grads"],
            },
            {  # the last layer's backward: every layer's activations alive, nothing reduced yet
                **state,
                "unsharded grads": accumulated,
                "unsharded params": gathered.running,
                "sharded grads": reduced_so_far,
                "activations": a.split(tokens * a.host, tokens * (a.kept + a.back)),
                "temporaries": temporaries["layer backward"],
            },
            {  # the next layer's backward, the last layer's gradients reduced and its activations freed
                **state,
                "unsharded grads": accumulated,
                "unsharded params": gathered.after_last,
                "sharded grads": reduced_so_far or p * sharded_numel(units[-1], n),
                "activations": a.split(
                    tokens * (a.host - a.host_last), tokens * (a.kept - (saved_last - a.host_last) + a.back)
                ),
                "reduce-scatter buffers": int(r * p_layer * (1 + 1 / n))
                + (r * sharded_numel(units[-1], n) if held else 0),
                "temporaries": temporaries["layer backward"],
            },
        ],
        "optimizer step": [
            {**state, "sharded grads": cats["sharded grads"], "temporaries": temporaries["optimizer step"]}
        ],
    }
    if (
        a.offload
    ):  # both places together at one moment: the host's all, and the device's own peak, do not meet
        cats["activations"] = max(whole(m.get("activations", 0)) for ms in moments.values() for m in ms)
    placed_cats = {**cats, "activations": a.category(tokens, activations, a_root)}
    placed = by_place(placed_cats, temporaries, moments, w.cpu_offload, a.offload)
    phases = {phase: max(sum(whole(v) for v in m.values()) for m in ms) for phase, ms in moments.items()}
    return {
        "categories": cats,
        "phases": phases,
        "peak": max(phases.values()),
        "peak_phase": max(phases, key=phases.get),
        **placed,
        "temporaries": temporaries,
        "activation copies": 2 * tokens * a.host * w.grad_accum_steps,  # bytes per step, each way summed
        "params": shape.num_params,
        # FSDP pads dim 0 of every parameter to a multiple of N: rows that hold nothing, on every rank.
        "padding elements": sum((-(-s[0] // n) * n - s[0]) * math.prod(s[1:]) for s in all_shapes),
    }
