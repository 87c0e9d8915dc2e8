"""``loraplex demo`` and the datasets it builds from text installed on the machine (never imported by the core).

Modules, each importing only those above it:

* ``entities``  -- entity regexes, silver spans, the word split, BIO tags
* ``text``      -- splits by source file, snippet keys, chunking, the English-prose check, file reading, the reader
* ``troff``     -- man pages (troff ``man`` macros) rendered to plain text
* ``sources``   -- finding source files on this machine (source kinds, folders, hash-based picks)
* ``sampling``  -- snippet pools per split, deduplication, balanced rows
* ``cache``     -- the JSONL/CSV + manifest cache of built datasets
* ``code``      -- code masks, Python docstrings, code snippets; the ``code_language`` dataset
* ``licences``  -- DEP-5 copyright files, licence families; the ``licences`` dataset
* ``manpages``  -- man-page snippets; the ``man_sections`` and ``man_languages`` datasets
* ``prose``     -- prose snippets; the ``text_kind``, ``entities`` and ``domains`` datasets
* ``datasets``  -- the datasets by name: ``build_dataset``, ``build_all``, ``describe_datasets``
* ``encoder``   -- ``loraplex demo``: three task adapters on MiniLM trained, merged, routed, evaluated, served
"""
