"""The embedded defaults: the models the repository builds and ships to demonstrate the library on
(the class-conditional toy DiT on 8x8 digits, the "text digits" SD, SDXL and SD3 defaults, their
fine-tuned derivatives), the recipes that build them, and their evaluation judges
(:mod:`defaults.judges`). A repository package like stages/: not part of the installed library,
which never imports it (a user's own model needs none of it)."""
