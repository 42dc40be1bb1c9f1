# nixpkgs' real library. tests/test_flake.py copies it to ./lib (git-ignored) before evaluating,
# from $NIXPKGS_LIB or ../shared/nixpkgs-lib/lib next to the repository.
if builtins.pathExists ./lib then
  import ./lib
else
  throw "the nixpkgs stand-in needs nixpkgs' lib/ directory at tests/nix/nixpkgs-stub/lib (tests/test_flake.py copies it there)"
