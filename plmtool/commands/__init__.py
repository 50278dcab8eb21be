"""One module per command: `run(cfg, run_dir) -> report` plus a `@hydra.main` entry point."""
