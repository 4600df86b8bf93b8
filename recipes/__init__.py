"""Built-in recipes, installed as ``edgetok.recipes`` so ``--recipe NAME`` works anywhere."""
