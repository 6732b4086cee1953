"""`evaluate` metric modules, loadable offline by path: `evaluate.load(str(path_of_module_file))`."""
