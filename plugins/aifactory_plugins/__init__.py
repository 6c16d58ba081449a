"""Built-in aifactory plugins; each module registers through the aifactory.plugins entry points."""
