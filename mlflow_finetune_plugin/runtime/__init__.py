"""What a heavy process of this project may use of the machine it runs on: the cores it may run on
(`cores.py`), the other heavy processes of the project that share them (`claims.py`), the threads it takes
(`threads.py`), the memory allocator it starts with (`allocator.py`), and the distributions installed beside
the plugin, where one of its extras holds a dependency back (`installed.py`). Imports nothing else of the
package."""
