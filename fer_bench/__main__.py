"""``python -m fer_bench`` = the ``ferbench`` command (so ``torchrun -m fer_bench train RECIPE`` works)."""

from fer_bench.cli import main

if __name__ == "__main__":
    main()
