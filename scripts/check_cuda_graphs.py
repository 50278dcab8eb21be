"""GPU check of every captured program (plmtool/cuda_graph.py users), on tiny random models.

For each engine option set (fp32 and bf16, Amphista and Medusa drafters): every program is
captured without a fallback warning, the drafter graph and greedy loop are on as asked, greedy
output equals plain greedy decoding in fp32, and sampling runs; a cache re-created after capture is
refused (the address guard); SparseGPT's graphed column blocks give the eager masks and weights.
Prints PASS/FAIL per check and ALL PASS at the end. Needs a CUDA GPU.

    python scripts/check_cuda_graphs.py
"""
import logging, sys, time, os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
warnings = []
class Catch(logging.Handler):
    def emit(self, rec): warnings.append(rec.getMessage())
logging.getLogger("plmtool").addHandler(Catch())

from transformers import LlamaConfig, LlamaForCausalLM
from plmtool.draft.config import DrafterConfig, EngineOptions
from plmtool.draft.drafter import build_drafter
from plmtool.draft.decoding import SpeculativeEngine, GenerationConfig
from plmtool.draft.decoding.tree import resolve_tree

def tiny(dtype, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2: p.normal_(0, 0.1)
    return m.to("cuda", dtype).eval()

def drafter_for(model, kind, seed=1):
    d = build_drafter(DrafterConfig(kind=kind, num_heads=3), target=model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            if p.requires_grad: p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p))
    return d.to("cuda", next(model.parameters()).dtype).eval()

def plain(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device="cuda")).logits[0, -1].argmax()))
    return seq[len(prompt):]

ok = True
def check(cond, what):
    global ok
    print(("PASS " if cond else "FAIL ") + what, flush=True)
    ok &= bool(cond)

tree = resolve_tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], 3)
prompts = [[5, 9, 13, 21, 7], list(range(3, 40)), [11]]
for dtype in (torch.float32, torch.bfloat16):
    model = tiny(dtype)
    for kind in ("amphista", "medusa"):
        for opts in (EngineOptions(), EngineOptions(sync_check=True), EngineOptions(greedy_loop=False),
                     EngineOptions(drafter_graph=False), EngineOptions(compile=True)):
            if opts.compile and (dtype != torch.float32 or kind != "amphista"):
                continue
            warnings.clear()
            t0 = time.time()
            e = SpeculativeEngine(model, drafter_for(model, kind), tree, max_len=512, options=opts)
            label = f"{str(dtype)[6:]} {kind} {opts}"
            print(f"--- {label}: built in {time.time()-t0:.1f}s; graphs={e.cuda_graphs} compiled={e.compiled} drafter_graph={e.drafter_graph} "
                  f"drafter_compiled={e.drafter_compiled} prefill={e.prefill_graphs} drafter_prefill={e.drafter_prefill_graphs} "
                  f"loop={None if e.greedy_loop is None else e.greedy_loop.graphs} warnings={warnings}", flush=True)
            check(e.cuda_graphs and e.prefill_graphs and not warnings, f"{label}: captured, no fallback")
            check(e.drafter_graph == bool(opts.drafter_graph), f"{label}: drafter graph as asked")
            check((e.greedy_loop is not None and e.greedy_loop.graphs) == bool(opts.greedy_loop and opts.drafter_graph), f"{label}: greedy loop")
            if opts.compile:
                check(e.compiled and e.drafter_compiled, f"{label}: compiled steps kept")
            same = 0
            for p in prompts:
                got = e.generate(p, max_new_tokens=40).tokens
                same += got == plain(model, p, 40)
                e.generate(p, GenerationConfig(max_new_tokens=20, temperature=0.8, seed=1))  # sampling: general loop
            if dtype == torch.float32:
                check(same == len(prompts), f"{label}: greedy equals plain greedy ({same}/{len(prompts)})")
            else:
                print(f"INFO {label}: {same}/{len(prompts)} equal plain greedy in bf16")
            del e
    # address guard on the GPU
    e = SpeculativeEngine(model, drafter_for(model, "amphista"), tree, max_len=512)
    e.generate([1, 2, 3], max_new_tokens=5)
    e.runner.cache.k = e.runner.cache.k.clone()
    try:
        e.generate([1, 2, 3], max_new_tokens=5); check(False, "re-created cache refused")
    except RuntimeError as err:
        check("re-created after capture" in str(err), f"re-created cache refused: {err}")
    del e, model
    torch.cuda.synchronize()

# SparseGPT column blocks
from plmtool.prune import sparsegpt
for pat in (sparsegpt.Pattern(sparsity=0.5, n=2, m=4), sparsegpt.Pattern(sparsity=0.5)):
    for rows, groups in ((384, None), (384, (128, 256))):
        g = torch.Generator(device="cuda").manual_seed(0)
        W = torch.randn(rows, 512, device="cuda", generator=g)
        X = torch.randn(512, 2048, device="cuda", generator=g)
        H = X @ X.T / 2048
        warnings.clear(); sparsegpt._GRAPHS.clear(); sparsegpt._GRAPHS_BROKEN = False
        t0 = time.time(); a = sparsegpt.prune_sparsegpt(W, H, pat, row_groups=groups); ta = time.time() - t0
        graphed = bool(sparsegpt._GRAPHS) and not sparsegpt._GRAPHS_BROKEN
        b = sparsegpt.prune_sparsegpt(W, H, pat, cuda_graphs=False, row_groups=groups)
        rel = float((a.weight - b.weight).norm() / b.weight.norm())
        check(graphed and not warnings and torch.equal(a.mask, b.mask) and rel < 1e-4,
              f"sparsegpt {pat} groups={groups}: graphed={graphed} warnings={warnings} masks equal={torch.equal(a.mask, b.mask)} rel={rel:.2e} ({ta:.2f}s)")
print("ALL PASS" if ok else "SOME FAILED")
