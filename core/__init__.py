"""headrace.core: the foundation every other folder may import, and that imports none of them.

* `errors`: the exceptions a user can act on (printed as one line by the CLI);
* `config`: frozen dataclass configs, their registry, command-line overrides and dumps;
* `mesh`: DTensor meshes, layouts and layout-independent initialisation;
* `outputs`: the staged output directory every pipeline and trainer writes through, and the work-dir name.
"""
