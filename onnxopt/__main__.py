"""``python -m onnxopt`` (also what ``torchrun -m onnxopt`` runs)."""
from .cli import main

main()
