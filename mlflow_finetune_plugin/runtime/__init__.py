"""What a heavy process of this project may use of the machine it runs on: the cores it may run on
(`cores.py`), the other heavy processes of the project that share them (`claims.py`), the threads it takes
(`threads.py`) and the memory allocator it starts with (`allocator.py`). Imports nothing else of the
package."""
