"""Recovery after compression: least-squares reconstruction, blockwise local distillation, global distillation."""
