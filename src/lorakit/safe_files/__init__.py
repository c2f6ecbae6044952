"""Crash-safe file writes, below the adapter engine so that any part of lorakit may use them.

    atomic.py            one file replaced whole (write, flush, rename); several files of one
                         folder swapped together (``replace_files_in_folder``)
    journal.py           the on-disk record of such a swap, and recovery from a killed one
    folder_lock.py       ``FolderLock``: one writer or many readers in a folder
    directory_export.py  a tree of files published as a new (or empty) folder, whole or not at all

Nothing here imports lorakit beyond ``lorakit.errors``.
"""
