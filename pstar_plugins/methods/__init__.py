"""Built-in methods. Each folder holds a method's whole story: config, modules, plugin."""
