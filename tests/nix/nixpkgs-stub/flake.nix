# A small stand-in for nixpkgs, so that this repository's flake can be evaluated (not built) with
# no network and no nixpkgs download:
#
#   cp -r .../nixpkgs/lib tests/nix/nixpkgs-stub/lib    # nixpkgs' real lib (tests/test_flake.py does this)
#   nix flake check --no-build --all-systems --offline --no-write-lock-file \
#     --override-input nixpkgs path:tests/nix/nixpkgs-stub
#
# It provides only what flake.nix, overlays/ and playbooks/ use, with the nixpkgs versions of the
# pinned revision, nixpkgs' real `lib`, and nixpkgs' `config` options with their defaults.
# Derivations are real `derivation`s with a builder that always fails, carrying their inputs as
# attributes for tests to inspect. python3.withPackages only knows the packages listed in
# ./python.nix, so a misspelt package name fails evaluation; ./python.nix also models the checks
# nixpkgs makes at build time (see its header).
{
  description = "nixpkgs stand-in for evaluating this flake offline";

  outputs =
    { self }:
    {
      lib = import ./lib.nix;
      legacyPackages = self.lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ] (system: import ./. { inherit system; });
    };
}
