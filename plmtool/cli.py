"""`plmtool <group> <command> [hydra overrides]`: a dispatcher, nothing more.

Each command is its own Hydra app (`plmtool/commands/<name>.py` with a `main` decorated by
`@hydra.main`). The dispatcher rewrites argv so that Hydra sees only the overrides, which keeps
`-m` sweeps, `--cfg job`, `hydra.run.dir=...` and launchers working unchanged. Nothing heavy is
imported here so that `plmtool --help` answers instantly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

# words on the command line -> (module, one-line description)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("eval",): ("plmtool.commands.eval", "perplexity and zero-shot accuracy of any model or checkpoint"),
    ("prune", "sds"): ("plmtool.commands.prune_sds", "one-shot pruning (magnitude/Wanda/SparseGPT) and Sparse-Dense-Sparse"),
    ("draft", "train"): ("plmtool.commands.draft_train", "train Medusa / Amphista drafting heads on a frozen target"),
    ("draft", "serve"): ("plmtool.commands.draft_serve", "OpenAI-compatible server with speculative decoding"),
    ("draft", "bench"): ("plmtool.commands.draft_bench", "speed benchmark: plain, generate(), Medusa, Amphista"),
    ("experts", "redistribute"): ("plmtool.commands.experts_redistribute", "cluster and redistribute instruction data in a semantic space"),
    ("experts", "train"): ("plmtool.commands.experts_train", "train one LoRA expert per cluster and a router"),
}


def available() -> dict[tuple[str, ...], tuple[str, str]]:
    """Commands whose module is present (groups land one by one)."""
    found = {}
    for words, (module, doc) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[words] = (module, doc)
    return found


def usage() -> str:
    lines = [
        "usage: plmtool <group> <command> [hydra overrides]",
        "",
        "commands:",
    ]
    for words, (_, doc) in available().items():
        lines.append(f"  {' '.join(words):<22} {doc}")
    lines += [
        "",
        "examples:",
        "  plmtool eval experiment=smoke",
        "  plmtool eval model.name_or_path=meta-llama/Meta-Llama-3-8B data.corpus=wikitext2",
        "  plmtool eval --cfg job            # print the composed config",
        "  plmtool eval -m eval.seqlen=512,1024   # a sweep: one run per value",
    ]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    """Split argv into (command words, hydra args); None if no command matches."""
    commands = available()
    for n in (2, 1):
        words = tuple(argv[:n])
        if len(words) == n and words in commands:
            return words, argv[n:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from plmtool import __version__

        print(f"plmtool {__version__}")
        return 0
    found = resolve(argv)
    if found is None:
        print(f"plmtool: unknown command '{' '.join(argv[:2])}'\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    words, rest = found
    # Hydra parses sys.argv itself; it must see only the overrides.
    sys.argv = [f"plmtool {' '.join(words)}", *rest]
    try:
        importlib.import_module(COMMANDS[words][0]).main()
    except KeyboardInterrupt:  # before or after a run (a run itself records it and exits 130)
        print("plmtool: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
