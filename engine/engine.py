"""LLMEngine: requests in, tokens out, one scheduler step at a time.

Aggregated lifecycle: ``add_request`` → waiting → running (chunked prefill, then decode)
→ finished. Disaggregated hooks:

* prefill side: ``add_request(..., prefill_only=True)`` computes the prompt, samples the
  first token and finishes as ``prefilled`` *keeping* its blocks; the KV layer hook sees
  each layer's pages as soon as that layer is computed; ``release`` frees the blocks once
  they were sent.
* decode side: ``reserve`` allocates blocks for a prompt (reusing prefix-cache hits) and
  returns the block ids to fill; after the KV arrived, ``admit_prefilled`` puts the request
  straight into the running batch with its first token; ``abort`` frees a reservation.

A rank of a parallel replica (``ParallelState``: tensor or expert parallel) builds its
shard of the model and hands every step to its driver (engine/parallel/driver.py); rank 0
runs this engine's scheduler, the others :meth:`LLMEngine.run_follower`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from engine.attention import get_backend
from engine.config import EngineConfig
from engine.config.engine import resolve_device
from engine.grammar import GrammarBackend
from engine.kv_cache.layout import KVLayout
from engine.kv_cache.shared_pool import SharedKVPool
from engine.kv_cache.spec import KVLayoutSpec
from engine.kv_handoff import KVLayerHook, LayerKV, Reservation
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.parallel.build import describe_rank, kv_heads
from engine.parallel.compose import make_driver, make_kv_manager
from engine.parallel.driver import FollowerRole, run_follower
from engine.parallel.ep import ExpertParallelGroup
from engine.parallel.expert_load import ExpertLoad, expert_load
from engine.parallel.state import ParallelState, as_parallel
from engine.request import Request, RequestOutput, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, make_output
from engine.scheduler_output import SchedulerOutput
from engine.throughput import PrefillRate
from engine.validation import check_params, check_prompt, check_token

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, parallel: ParallelState | ExpertParallelGroup | None = None
    ) -> None:
        """``parallel``: this engine is one rank of a parallel replica (rank 0 leads)."""
        config = replace(config, device=resolve_device(config.device))  # auto: this node's
        self.config = config
        self.parallel = as_parallel(parallel)
        self.device = torch.device(config.device)
        dtype = config.torch_dtype
        loaded = load_model(config.model, dtype, config.device, config.max_model_len, self.parallel)
        self.model, self.spec, self.fingerprint = loaded.model, loaded.spec, loaded.fingerprint
        self.max_model_len = self._max_model_len(config)
        self.heads = kv_heads(self.spec, self.parallel)
        """Global KV heads ``[start, end)`` in this rank's cache."""
        self.layout = self._layout(config, dtype)
        self.kv = make_kv_manager(self.parallel, self.layout, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self.backend = get_backend(
            config.attention_backend, config.device, config.cache.kv_cache_dtype
        )
        self.grammars = GrammarBackend(config.model, self.spec.vocab_size, self.spec.eos_token_ids)
        """Compiled structured-output grammars; thread-safe (engine/worker/service.py)."""
        self.kv_pool = SharedKVPool.create(self.layout, self.device) if config.cache.shared_memory else None  # fmt: skip
        """The KV cache in shared memory (``cache.shared_memory``), else ``None``."""
        self.runner = self._runner(config)
        self.driver = make_driver(self.parallel, self.runner, self.kv)
        self.kv_layer_hook: KVLayerHook | None = None
        self._reserved: dict[str, Request] = {}
        self._kv_streamed: set[str] = set()
        self.prefill_rate = PrefillRate()
        """Measured prompt tokens per second (the router predicts TTFT with it)."""
        logger.info(
            "engine ready: %s, %d KV blocks of %d tokens (%s, %d B/token), max_model_len=%d, "
            "attention=%s%s",
            self.spec.architecture, self.layout.num_blocks, self.layout.block_size,
            self.layout.kv_cache_dtype, self.layout.bytes_per_token,
            self.max_model_len, self.backend.name, describe_rank(self.parallel, self.heads),
        )  # fmt: skip

    def _runner(self, config: EngineConfig) -> ModelRunner:
        pool = self.kv_pool
        caches = pool.caches if pool is not None else self.layout.allocate(self.device)
        block_size = self.layout.block_size
        return ModelRunner(
            self.model, caches, self.backend, block_size, self.device, config.seed,
            vocab_size=self.spec.vocab_size, grammars=self.grammars,
        )  # fmt: skip

    # -- setup ----------------------------------------------------------------------------

    def _max_model_len(self, config: EngineConfig) -> int:
        limit = self.spec.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's "
                f"max_position_embeddings={limit}; pass --max-model-len {limit} or less"
            )
        return config.max_model_len or limit

    def _layout(self, config: EngineConfig, dtype: torch.dtype) -> KVLayout:
        """This rank's cache: its KV heads only (every rank has the same block count),
        as many blocks as the byte budget buys in the configured KV dtype."""
        spec, cache = self.spec, config.cache
        heads = self.heads[1] - self.heads[0]
        shape = (spec.num_layers, 1, cache.block_size, heads, spec.head_dim, dtype)
        one = KVLayout(*shape, kv_cache_dtype=cache.kv_cache_dtype)
        num_blocks = cache.num_blocks or max(1, cache.kv_cache_memory_bytes // one.bytes_per_block)
        return replace(one, num_blocks=num_blocks)

    @property
    def ep_size(self) -> int:
        return self.parallel.ep_size

    @property
    def tp_size(self) -> int:
        return self.parallel.tp_size

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.runner.kv_caches

    @property
    def layout_spec(self) -> KVLayoutSpec:
        """The replica's KV layout (every head), which a cluster's workers share."""
        spec = KVLayoutSpec.from_layout(self.layout, self.fingerprint)
        return replace(spec, num_kv_heads=self.spec.num_kv_heads)

    @property
    def rank_layout_spec(self) -> KVLayoutSpec:
        """This rank's part of it (TP size, rank and heads): what its KV links pair with."""
        return self.layout_spec.for_rank(
            self.tp_size, self.parallel.rank % self.tp_size, self.heads
        )

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; raises ``ValueError`` naming the problem for bad input."""
        self._check_request(request_id, prompt_token_ids, params)
        req = Request(
            request_id, list(prompt_token_ids), params, self.spec.eos_token_ids, prefill_only
        )
        self.scheduler.add(req)

    def _check_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if (
            request_id in self.scheduler.requests
            or self.kv.holds(request_id)
            or request_id in self._reserved
        ):
            raise ValueError(f"request id {request_id!r} is already in use")
        check_prompt(prompt, self.spec.vocab_size, self.max_model_len)
        check_params(params, self.spec.vocab_size)
        self.grammars.prepare(params.structured)  # a worker's handler compiled it already
        need = self.layout.num_blocks_for(len(prompt) + 1)
        if need > self.layout.num_blocks:
            raise ValueError(
                f"prompt needs {need} KV blocks but the pool has {self.layout.num_blocks}; "
                "raise --num-kv-blocks or shorten the prompt"
            )

    def abort(self, request_id: str) -> bool:
        """Stop a request at any point (waiting, running, reserved or prefilled) and free
        its blocks. Returns whether anything was held."""
        self._kv_streamed.discard(request_id)
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            return True
        self._reserved.pop(request_id, None)
        if self.kv.holds(request_id):
            self.kv.free(request_id)
            return True
        return False

    def abort_all(self) -> None:
        """Abort every request, reservation and prefilled hand-off: every block is free
        again (the engine cannot go on, e.g. a rank of its group died)."""
        for rid in {*self.scheduler.requests, *self._reserved, *self.kv.request_ids()}:
            self.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    # -- stepping -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and report what each request gained."""
        t0 = time.perf_counter()
        so = self.scheduler.schedule()
        items = self._stream_items(so)
        sampled = self.driver.execute(so, items, self._layer_hook(items))
        self.prefill_rate.observe(so, time.perf_counter() - t0)
        return self.scheduler.update(so, sampled.sampled, sampled.prompt_logprobs)

    def run_follower(self, role: FollowerRole | None = None) -> int:
        """Follower rank: run the leader's steps until it calls :meth:`stop_followers`;
        ``role`` adds the worker role's part (its KV hook)."""
        assert not self.parallel.is_leader, "only follower ranks follow"
        return run_follower(self.driver, self.parallel, role)

    def expert_load(self) -> ExpertLoad | None:
        """Tokens routed per expert and per EP rank since start (``None``: dense model);
        on the leader of a parallel replica, every rank's."""
        return expert_load(self.driver.expert_counts(), self.ep_size)

    def heartbeat(self) -> None:
        """Leader, idle: an empty step, so followers see the leader is alive."""
        self.driver.heartbeat()

    def stop_followers(self) -> None:
        """Leader: release the followers from :meth:`run_follower`."""
        if self.parallel.is_leader:
            self.driver.stop()

    def _stream_items(self, so: SchedulerOutput) -> list[LayerKV]:
        """What the KV layer hook gets this step (nothing without a hook)."""
        if self.kv_layer_hook is None:
            return []
        items = []
        for s in so.sequences:
            if not s.stream_kv:
                continue
            start = s.start_pos if s.request_id in self._kv_streamed else 0
            self._kv_streamed.add(s.request_id)
            items.append(LayerKV(s.request_id, s.block_ids, start, s.start_pos + s.num_tokens))
        return items

    def _layer_hook(self, items: list[LayerKV]) -> Callable[[int], None] | None:
        if not items:
            return None
        hook, caches = self.kv_layer_hook, self.kv_caches
        return lambda layer: hook(layer, items, caches[layer])

    # -- disaggregation -------------------------------------------------------------------

    def release(self, request_id: str) -> None:
        """Free a prefilled request's blocks once its KV was sent."""
        self._kv_streamed.discard(request_id)
        self.kv.free(request_id)

    def reserve(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Reservation | None:
        """Allocate blocks for a prompt whose KV another worker computes; ``None`` if full."""
        self._check_request(request_id, prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, self.spec.eos_token_ids)
        prefix = self.kv.find_prefix(req)
        if not self.kv.allocate(req, req.num_tokens - prefix.num_tokens, prefix, cache=False):
            return None
        self._reserved[request_id] = req
        req.num_cached_tokens = prefix.num_tokens
        return Reservation(
            request_id,
            tuple(self.kv.block_ids(request_id)),
            prefix.num_tokens // self.layout.block_size,
        )

    def admit_prefilled(
        self, request_id: str, first_token: int, first_logprobs: dict[int, float] | None = None
    ) -> RequestOutput:
        """Start decoding a reserved request whose prompt KV has fully arrived."""
        check_token("first token id", first_token, self.spec.vocab_size)
        req = self._reserved.pop(request_id, None)
        if req is None:
            raise KeyError(f"no reservation for request {request_id!r} (expired or aborted?)")
        req.num_computed_tokens = req.num_prompt_tokens
        self.kv.cache_blocks(req, req.num_prompt_tokens)
        req.append_output(first_token, first_logprobs)
        status = self.scheduler.stop_status(req)
        if status is not None:
            req.status = status
            self.kv.free(request_id)
        else:
            cached = req.num_cached_tokens // self.layout.block_size
            self.driver.admitted(request_id, self.kv.block_ids(request_id)[cached:])
            self.scheduler.add_running(req)
        return make_output(req, 1)
