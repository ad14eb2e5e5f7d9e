"""Transfer worker: moves checkpoint images and filesystem changes between hosts."""
