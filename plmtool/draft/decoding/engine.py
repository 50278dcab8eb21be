"""Generation loops over the static-cache target: plain decoding and tree speculative decoding.

Per step of the speculative loop (batch 1):
  1. the drafter's K heads (logits for the positions after the bonus token) give their top-k
     candidates; the static tree picks which ones form the nodes;
  2. one target forward over the tree (root = the bonus token, not yet in the cache);
  3. verification accepts a path (greedy / lossless sampling / opt-in typical acceptance) and the
     target's next token after it (the new bonus token);
  4. the cache is compacted to the accepted path; the drafter is stepped with the hidden states of
     the accepted positions and the tokens that follow them, which yields the next K heads.

The plain loop is the same machinery with a one-node tree, so the two share every kernel and
differ only by the drafting. Accepted tokens per step counts the accepted drafted tokens plus the
bonus token; the token produced by the prefill is not a step (plain decoding: exactly 1.00).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from plmtool.cuda_graph import capture_checked
from plmtool.draft.config import EngineOptions
from plmtool.draft.decoding.device import check_device, variable_shape_attention
from plmtool.draft.decoding.drafter_step import DrafterProgram
from plmtool.draft.decoding.dynamic_tree import DynamicTree
from plmtool.draft.decoding.greedy_loop import GreedyTreeLoop
from plmtool.draft.decoding.prefill import DrafterPrefills, drafter_prefills, lengths_up_to
from plmtool.draft.decoding.target import StepProgram, TargetRunner
from plmtool.draft.decoding.tree import Tree, make_tree
from plmtool.draft.decoding.verify import Verdict, filter_probs, greedy_verify, sample_verify, typical_verify
from plmtool.errors import PlmtoolError

log = logging.getLogger("plmtool")

ACCEPTANCE = ("lossless", "typical")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    acceptance: str = "lossless"  # lossless | typical (Medusa's, lossy; only with temperature > 0)
    typical_epsilon: float = 0.09
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise PlmtoolError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise PlmtoolError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PlmtoolError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.acceptance not in ACCEPTANCE:
            raise PlmtoolError(f"acceptance must be one of {', '.join(ACCEPTANCE)}, got '{self.acceptance}'")


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    accept_lengths: list[int] = field(default_factory=list)  # tokens kept per verification step
    finish_reason: str = "length"  # "stop" when a stop token was produced

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 1.0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "mean_accepted": round(self.mean_accepted, 4), "accept_lengths": list(self.accept_lengths)}


class SpeculativeEngine:
    """Plain or speculative generation for one target (and optionally one drafter), batch 1.

    Not thread-safe: one generation at a time (`batch.py` decodes several sequences together).
    """

    def __init__(self, model, drafter=None, tree: Sequence[Sequence[int]] | None = None, max_len: int = 2048,
                 options: EngineOptions | None = None, runner: TargetRunner | None = None,
                 dynamic_pool: Sequence[Sequence[int]] | None = None):
        """`options`: which programs are captured, compiled and checked (`EngineOptions`, the
        `engine` node of bench and serve; defaults: graphs on CUDA, no compilation). `runner`: share
        one target runner (its KV cache) between engines of the same model that never decode
        concurrently; it was built compiled or not, so `options.compile` then applies to the
        drafter step only. `dynamic_pool`: candidate paths of a dynamic tree (`dynamic_tree.py`):
        greedy steps then decode with a tree of `tree`'s size picked from these paths by the
        drafter's probabilities at every step; the static `tree` serves sampling (and greedy
        decoding if the device loop is off)."""
        if runner is not None and runner.model is not model:
            raise ValueError("the shared runner belongs to another model")
        opts = options if options is not None else EngineOptions()
        opts.check()
        self.options = opts
        self.runner = runner if runner is not None else TargetRunner(model, max_len, compile=opts.compile)
        self.model = model
        self.drafter = drafter
        self.device = self.runner.device
        self.max_len = self.runner.max_len
        self.sync_check = bool(opts.sync_check)
        use_graphs = opts.graphs_on(self.device)
        use_drafter_graph = use_graphs and bool(opts.drafter_graph)
        pool = None  # each step program keeps its own graph memory: programs never share outputs
        self.use_prefill_graphs = opts.prefill_graphs_on(self.device)
        if self.use_prefill_graphs:
            self.runner.enable_prefill_graphs()  # padded prompt lengths, one replay per prefill (prefill.py)
        one = make_tree([])
        self.plain_step = StepProgram(self.runner, one.depth, one.ancestors, use_graphs, pool, self.sync_check)
        self.tree: Tree | None = None
        self.tree_step: StepProgram | None = None
        if drafter is not None:
            if tree is None:
                raise PlmtoolError("a drafter needs a candidate tree")
            self.tree = make_tree(tree, num_heads=drafter.num_heads).to(self.device)
            if self.tree.n + 1 > self.max_len:
                raise PlmtoolError(f"tree of {self.tree.n} nodes does not fit the context of {self.max_len}")
            self.tree_step = StepProgram(self.runner, self.tree.depth, self.tree.ancestors, use_graphs, pool, self.sync_check)
        self.dynamic_tree: DynamicTree | None = None
        self.dynamic_step: StepProgram | None = None
        if drafter is not None and dynamic_pool is not None:
            self.dynamic_tree = DynamicTree(dynamic_pool, self.tree.n, self.device, drafter.num_heads)
            # its own program: the dynamic tree rewrites its step's mask and depths in place, which the
            # static tree of the general loop must not see
            self.dynamic_step = StepProgram(self.runner, self.dynamic_tree.depth, self.dynamic_tree.ancestors,
                                            use_graphs, pool, self.sync_check)
        # Drafters with a fixed-shape step (every plmtool drafter) run it through a DrafterProgram
        # over one engine-lifetime cache (captured as a CUDA graph on CUDA); others step eagerly
        # with a fresh cache per request.
        self.drafter_step: DrafterProgram | None = None
        if drafter is not None and opts.static_drafter and hasattr(drafter, "step_static"):
            with torch.no_grad():
                dcache = drafter.new_cache(1, self.max_len, self.device, self.runner.dtype)
            rows = max(int(t.paths.shape[1]) for t in (self.tree, self.dynamic_tree) if t is not None)  # deepest path + 1
            self.drafter_step = DrafterProgram(drafter, dcache, rows, self.runner.hidden_size,
                                               self.device, self.runner.dtype, use_drafter_graph,
                                               compile=bool(opts.compile), sync_check=self.sync_check)
        # greedy decoding with a fixed-shape drafter step: verification, commit and drafting on
        # the device, no host decision between the programs (greedy_loop.py)
        self.greedy_loop: GreedyTreeLoop | None = None
        if self.drafter_step is not None and opts.greedy_loop:
            tree, step = (self.tree, self.tree_step) if self.dynamic_tree is None else (self.dynamic_tree, self.dynamic_step)
            # capture unsupported here: the general loop decodes greedily too
            self.greedy_loop = capture_checked("device-side greedy loop", "using the general loop",
                                               lambda: GreedyTreeLoop(self.runner, tree, step, self.drafter_step, use_graphs,
                                                                      self.sync_check))
        # the drafter's prefill padded to the same ladder, one replay per request over the drafter
        # step's cache; only where that step is captured (an eager padded prefill saves nothing)
        self.drafter_prefills: DrafterPrefills | None = None
        if self.use_prefill_graphs and self.drafter_step is not None and self.drafter_step.graph is not None:
            # the longest prompt check_request lets through: room for one new token and the tree
            longest = self.max_len - 1 - self.tree.n
            self.drafter_prefills = drafter_prefills(self.drafter_step, lengths_up_to(self.max_len, longest))
        # graphs in use only where every program captured
        # greedy requests decode with the dynamic tree (only through the device loop)
        self.dynamic = self.greedy_loop is not None and self.greedy_loop.dynamic
        steps = [s for s in (self.plain_step, self.tree_step, self.dynamic_step if self.dynamic else None) if s is not None]
        self.cuda_graphs = all(s.graph is not None for s in steps)
        self.compiled = all(s.compiled for s in steps)
        if self.dynamic_tree is not None and not self.dynamic:
            log.warning("dynamic tree unused: it needs the device-side greedy loop; greedy requests use the static tree")
        self.drafter_graph = self.drafter_step is not None and self.drafter_step.graph is not None
        self.prefill_graphs = self.use_prefill_graphs and self.runner.prefill_graphs is not None
        self.drafter_prefill_graphs = self.drafter_prefills is not None and self.drafter_prefills.cuda_graphs
        self.drafter_compiled = self.drafter_step is not None and self.drafter_step.compiled

    @property
    def speculative(self) -> bool:
        return self.drafter is not None

    def check_request(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise PlmtoolError when a request cannot fit the context (the server turns it into a 400)."""
        check_fits(prompt_len, max_new_tokens, self.max_len, self.tree.n if self.tree is not None else 1)

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: Sequence[int], gen: GenerationConfig | None = None, **kw: Any) -> GenerationResult:
        result = None
        for _, result in self.stream(prompt, gen, **kw):
            pass
        assert result is not None
        return result

    def stream(self, prompt: Sequence[int], gen: GenerationConfig | None = None, **kw: Any) -> Iterator[tuple[list[int], GenerationResult]]:
        """Yield (new tokens, running result) after the prefill and after each step."""
        gen = gen or GenerationConfig(**kw)
        gen.validate()
        prompt = [int(t) for t in prompt]
        self.check_request(len(prompt), gen.max_new_tokens)
        result = GenerationResult(prompt_tokens=len(prompt))
        cpu_gen = sampler(gen)
        stops = set(int(t) for t in gen.stop_token_ids)
        # no grad-mode context spans a `yield`: a consumer may resume this generator on another
        # thread (the server streams from a thread pool) and grad mode is thread-local
        yield from self._loop(prompt, gen, result, cpu_gen, stops)

    # ------------------------------------------------------------------ internals
    def _loop(self, prompt: list[int], gen: GenerationConfig, result: GenerationResult, cpu_gen, stops: set[int]):
        runner = self.runner
        with torch.inference_mode():
            logits, hidden = runner.prefill(prompt, graphs=self.use_prefill_graphs)
            if self.sync_check:
                check_device("the target prefill")
            token = choose(logits, gen, cpu_gen)
        kept, done = emit([token], gen, result, stops)
        # `hidden` may be a view into the prefill graphs' memory, read by the drafter's prefill
        # after this yield: safe because an engine (and a shared runner) decodes one stream at a time
        yield kept, result
        if done:
            return
        if self.drafter is None:
            step = self.plain_step
            buf = torch.zeros(1, dtype=torch.long, device=self.device)
            while True:
                with torch.inference_mode():
                    buf.fill_(token)
                    logits, _ = step(buf, runner.length)
                    runner.cache.length += 1
                    token = choose(logits[0], gen, cpu_gen)
                kept, done = emit([token], gen, result, stops)
                result.accept_lengths.append(len(kept))
                yield kept, result
                if done:
                    return
        tree, step = self.tree, self.tree_step
        assert tree is not None and step is not None
        drafter = self.drafter
        max_depth = tree.max_depth  # host int, read once (the property reads a device tensor)
        program = self.drafter_step
        with torch.inference_mode():
            if program is not None:
                dcache = program.cache
                drafter.crop_cache(dcache, 0)
            else:
                dcache = drafter.new_cache(1, self.max_len, self.device, runner.dtype)
            if self.use_prefill_graphs and self.drafter_prefills is not None:
                # padded to the ladder, one replay over `program.cache` (prefill.py); leaves the
                # cache as the eager prefill does: host-side length and device-side start n
                heads = self.drafter_prefills(hidden, prompt[1:] + [token])  # [1, K, V]
            else:
                nxt = torch.tensor([prompt[1:] + [token]], device=self.device)
                with variable_shape_attention():
                    heads = drafter.step(hidden.unsqueeze(0), nxt, dcache)  # [1, K, V] (prefill: eager)
            if self.sync_check:
                check_device("the drafter prefill")
        if gen.temperature == 0 and self.greedy_loop is not None:
            yield from self._greedy(heads, token, gen, result, stops)
            return
        with torch.inference_mode():
            tokens = torch.empty(tree.n, dtype=torch.long, device=self.device)
            nxt = torch.empty(1, max_depth + 1, dtype=torch.long, device=self.device)
        # Host reads per step: only the verdict (greedy: one transfer holding the accepted node,
        # its tokens and the bonus token); everything else stays on the device.
        while True:
            with torch.inference_mode():
                cands = torch.topk(heads[0, :max_depth], tree.topk, dim=-1).indices.reshape(-1)
                tokens[:1].fill_(token)
                tokens[1:] = cands[tree.candidate_index]
                start = runner.length
                logits, hidden = step(tokens, start)
                verdict = self._verify(tree, tokens, logits, gen, cpu_gen)
                # host-side checks of the indices the next kernels use (an out-of-range node or
                # length would fault on the GPU instead of raising)
                if not (0 <= verdict.node < tree.n and 1 <= verdict.length <= max_depth + 1):
                    raise RuntimeError(f"verification returned node {verdict.node} / length {verdict.length} "
                                       f"outside a tree of {tree.n} nodes and depth {max_depth}")
                path = tree.paths[verdict.node]
                runner.cache.compact(start, path)
                runner.cache.length = start + verdict.length
                accepted_path = path[: verdict.length]
                if verdict.path_tokens is not None:
                    drafted = verdict.path_tokens[1:]
                else:
                    drafted = tokens[accepted_path[1:]].tolist()
                token = verdict.bonus
            kept, done = emit(drafted + [token], gen, result, stops)
            result.accept_lengths.append(len(kept))
            yield kept, result
            if done:
                return
            with torch.inference_mode():
                # the drafter reads the accepted positions and the token after each one: the
                # drafted tokens (still on the device) then the bonus token
                n = verdict.length
                if program is not None:
                    # fixed shapes: the whole padded path (rows past n are ignored by the step)
                    width = int(path.shape[0])  # may be less than the program's rows (a deeper dynamic tree)
                    torch.index_select(hidden, 0, path, out=program.hidden[0, :width])
                    torch.index_select(tokens, 0, path[1:], out=program.next_tokens[0, : width - 1])
                    program.next_tokens[0, n - 1 : n].fill_(token)
                    heads = program(n)
                else:
                    nxt[0, : n - 1] = tokens.index_select(0, accepted_path[1:])
                    nxt[0, n - 1 : n].fill_(token)
                    with variable_shape_attention():
                        heads = drafter.step(hidden.index_select(0, accepted_path).unsqueeze(0), nxt[:, :n], dcache)
                    if self.sync_check:
                        check_device("the eager drafter step")

    def _greedy(self, heads: torch.Tensor, token: int, gen: GenerationConfig, result: GenerationResult, stops: set[int]):
        loop = self.greedy_loop
        assert loop is not None
        with torch.inference_mode():
            loop.begin(heads, token)
        while True:
            with torch.inference_mode():
                _, bonus, path = loop.step()
            kept, done = emit(path[1:] + [bonus], gen, result, stops)
            result.accept_lengths.append(len(kept))
            yield kept, result
            if done:
                return

    def _verify(self, tree: Tree, tokens: torch.Tensor, logits: torch.Tensor, gen: GenerationConfig, cpu_gen) -> Verdict:
        if gen.temperature == 0:
            return greedy_verify(tree, tokens, logits)
        return sampled_verdict(tree, tokens, logits, gen, cpu_gen)


# ---------------------------------------------------------------------- shared by both engines
def check_fits(prompt_len: int, max_new_tokens: int, max_len: int, reserve: int) -> None:
    """Raise PlmtoolError unless a prompt, its answer and `reserve` tree slots fit the context."""
    if prompt_len < 1:
        raise PlmtoolError("the prompt is empty")
    if prompt_len + max_new_tokens + reserve > max_len:
        raise PlmtoolError(
            f"prompt ({prompt_len} tokens) + max_tokens ({max_new_tokens}) exceeds the context of {max_len} tokens"
            f"{f' (less {reserve} slots for the candidate tree)' if reserve > 1 else ''}"
        )


def sampler(gen: GenerationConfig) -> torch.Generator | None:
    """The request's CPU generator (None when greedy): seeded by `gen.seed`, else by the clock."""
    if gen.temperature == 0:
        return None
    g = torch.Generator()
    g.manual_seed(gen.seed if gen.seed is not None else int(time.time_ns() % 2**31))
    return g


def choose(logits: torch.Tensor, gen: GenerationConfig, cpu_gen) -> int:
    """The next token from one position's logits: argmax, or a sample of the filtered distribution."""
    if gen.temperature == 0:
        return int(logits.argmax().item())
    p = filter_probs(logits, gen.temperature, gen.top_p, gen.top_k).double().cpu()
    return int(torch.multinomial(p, 1, generator=cpu_gen).item())


def sampled_verdict(tree: Tree, tokens: torch.Tensor, logits: torch.Tensor, gen: GenerationConfig, cpu_gen) -> Verdict:
    """Verification at temperature > 0: lossless speculative sampling, or typical acceptance (a
    one-node tree has no candidate to accept: plain sampling from the filtered distribution)."""
    if gen.acceptance == "typical" and tree.n > 1:
        return typical_verify(tree, tokens, logits, gen.temperature, gen.typical_epsilon, generator=cpu_gen)
    return sample_verify(tree, tokens, logits, gen.temperature, gen.top_p, gen.top_k, generator=cpu_gen)


def emit(chunk: list[int], gen: GenerationConfig, result: GenerationResult, stops: set[int]) -> tuple[list[int], bool]:
    """Append the step's tokens to `result` up to max_new_tokens and the first stop token; returns
    (the tokens kept, whether the sequence is done)."""
    room = gen.max_new_tokens - len(result.tokens)
    kept: list[int] = []
    done = False
    for t in chunk[:room]:
        kept.append(t)
        if t in stops:
            result.finish_reason, done = "stop", True
            break
    result.tokens.extend(kept)
    if len(result.tokens) >= gen.max_new_tokens:
        done = True
    return kept, done
