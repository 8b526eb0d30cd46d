"""`python -m trainer` runs the same entry point as the `mnist-distill` console script."""

from trainer.cli import run

if __name__ == "__main__":
  run()
