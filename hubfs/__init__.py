"""hubfs: a content-addressed, deduplicating store for ML model caches, mounted with FUSE.

Layers, bottom up: ``chunking``/``tensor_layout`` cut bytes, ``codecs`` encode them, ``packs``
keep them at rest, ``index`` keeps metadata in LMDB, ``namespace`` owns names and inodes,
``store`` ties them into one engine, ``reader`` serves content; ``importer``, ``verify`` and
``cli`` are tools on top; ``fs`` and ``mount`` put the engine behind FUSE.
"""

__version__ = "0.1.0"
