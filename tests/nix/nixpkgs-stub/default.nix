# `import nixpkgs { system; overlays; config; }` for the stand-in: a fixed point of the base set
# below extended by the overlays, like nixpkgs' own, with nixpkgs' real `lib` (./lib, see
# ./flake.nix) and nixpkgs' `config` module semantics (./config.nix).
{
  system ? builtins.currentSystem,
  overlays ? [ ],
  config ? { },
  ...
}:
let
  lib = import ./lib.nix;

  # Like nixpkgs: the user's config is one module of the config module system, so every option
  # has its default (cudaCapabilities = [ ], cudaSupport = false, ...).
  config' =
    (lib.evalModules {
      modules = [
        ./config.nix
        { inherit config; }
      ];
    }).config;

  hostPlatform = lib.systems.elaborate system;

  # nixpkgs' check-meta: a package that is broken, unfree or not meant for this platform refuses
  # to evaluate once its derivation is needed (drvPath, outPath), unless config allows it.
  metaProblem =
    name: meta:
    let
      licenses = lib.toList (meta.license or [ ]);
      unfree = builtins.any (l: !(l.free or true)) licenses;
      available = lib.meta.availableOn hostPlatform { inherit meta; };
      unfreeAllowed =
        config'.allowUnfree
        || (config' ? allowUnfreePredicate && config'.allowUnfreePredicate { inherit name meta; });
    in
    if (meta.broken or false) && !config'.allowBroken then
      "is marked as broken"
    else if !available && !config'.allowUnsupportedSystem then
      "is not available on the requested hostPlatform ${system} (meta.platforms)"
    else if unfree && !unfreeAllowed then
      "has an unfree license, and config.allowUnfree is not set"
    else
      null;

  # A derivation that evaluates like a real one (drvPath, outPath) but never builds. `env` becomes
  # derivation attributes (strings, lists, derivations); `passthru` is added to the result only.
  mkFake =
    {
      name,
      env ? { },
      passthru ? { },
      outputs ? [ "out" ],
      meta ? { },
      # Attributes (bool/string valued) that are only evaluated when the derivation is
      # instantiated, for checks nixpkgs would only run at build time.
      checks ? { },
    }:
    let
      storable = lib.filterAttrs (
        _: v:
        builtins.isString v
        || builtins.isBool v
        || builtins.isInt v
        || builtins.isList v
        || builtins.isPath v
        || lib.isDerivation v
      ) env;
      problem = metaProblem name meta;
      drv = derivation (
        storable
        // checks
        // {
          inherit name system outputs;
          checkMeta =
            problem == null
            || throw "Package '${name}' in the nixpkgs stand-in ${problem}, refusing to evaluate (nixpkgs' check-meta).";
          builder = "/bin/sh";
          args = [
            "-c"
            "echo 'this is the nixpkgs stand-in used for evaluation tests; it cannot build' >&2; exit 1"
          ];
        }
      );
    in
    drv // env // passthru // { inherit meta; };

  base =
    final:
    let
      cudaVersion = "12.9";
      # nixpkgs' default capabilities for CUDA 12.9 (every non-Jetson baseline capability); used
      # when config.cudaCapabilities is [ ] (its default), as nixpkgs' cudaPackages do.
      defaultCapabilities = [
        "7.5"
        "8.0"
        "8.6"
        "8.9"
        "9.0"
        "10.0"
        "10.3"
        "12.0"
        "12.1"
      ];
      capabilities =
        if config'.cudaCapabilities != [ ] then config'.cudaCapabilities else defaultCapabilities;
      minimumCuda = {
        "12.1" = "12.9";
        "12.0" = "12.8";
      };
      cudaPackages = {
        cudaMajorMinorVersion = cudaVersion;
        cudaMajorVersion = "12";
        cuda_nvcc = mkFake {
          name = "cuda_nvcc-12.9.86";
          outputs = [
            "out"
            "bin"
          ];
          meta.license = lib.licenses.nvidiaCudaRedist;
        };
        flags = {
          cudaCapabilities = map (
            c:
            if lib.versionOlder cudaVersion (minimumCuda.${c} or "0") then
              throw "CUDA ${cudaVersion} does not support compute capability ${c}"
            else
              c
          ) capabilities;
          cmakeCudaArchitecturesString = builtins.concatStringsSep ";" (
            map (builtins.replaceStrings [ "." ] [ "" ]) cudaPackages.flags.cudaCapabilities
          );
        };
      };
      tool =
        name: version: mainProgram:
        mkFake {
          name = "${name}-${version}";
          env = {
            pname = name;
            inherit version;
          };
          meta = { inherit mainProgram; };
        };
    in
    {
      inherit lib system;
      config = config';

      stdenv = {
        inherit hostPlatform;
        buildPlatform = hostPlatform;
        targetPlatform = hostPlatform;
        # gcc's runtime libraries (libgcc_s, libstdc++): what autoPatchelfHook links wheels to.
        cc.cc = mkFake {
          name = "gcc-14.3.0";
          outputs = [
            "out"
            "lib"
          ];
        };
      };

      callPackage =
        fn: args:
        let
          f = if builtins.isFunction fn then fn else import fn;
        in
        f (builtins.intersectAttrs (builtins.functionArgs f) final // args);

      mkShell =
        {
          name ? "nix-shell",
          packages ? [ ],
          shellHook ? "",
          passthru ? { },
          ...
        }@attrs:
        assert
          builtins.all lib.isDerivation packages || throw "mkShell: packages must be derivations";
        mkFake {
          inherit name passthru;
          env = removeAttrs attrs [ "passthru" ] // {
            inherit shellHook;
          };
        };

      runCommand =
        name: env: buildCommand:
        assert builtins.isString buildCommand;
        mkFake {
          inherit name;
          env = removeAttrs env [ "passthru" ] // {
            inherit buildCommand;
          };
          passthru = env.passthru or { };
        };

      writeShellApplication =
        {
          name,
          text,
          runtimeInputs ? [ ],
          meta ? { },
          ...
        }:
        assert builtins.all lib.isDerivation runtimeInputs;
        mkFake {
          inherit name;
          env = {
            inherit text runtimeInputs;
          };
          meta = meta // {
            mainProgram = name;
          };
        };

      # A fixed-output download: `url` and an SRI `hash` (or `sha256`), as nixpkgs' fetchurl.
      fetchurl =
        {
          url,
          hash ? null,
          sha256 ? null,
          name ? baseNameOf url,
          ...
        }:
        assert
          (hash != null || sha256 != null)
          || throw "fetchurl ${url}: a hash is required (nixpkgs refuses to fetch without one)";
        mkFake {
          inherit name;
          env = {
            inherit url;
            outputHash = if hash != null then hash else sha256;
          };
        };

      # nixpkgs' fetchFromGitHub: a fixed-output download of a revision's tarball, unpacked.
      fetchFromGitHub =
        {
          owner,
          repo,
          rev ? null,
          tag ? null,
          hash,
          ...
        }:
        assert
          (rev != null) != (tag != null)
          || throw "fetchFromGitHub ${owner}/${repo}: exactly one of rev and tag";
        mkFake {
          name = "source";
          env = {
            inherit owner repo;
            rev = if tag != null then "refs/tags/${tag}" else rev;
            url = "https://github.com/${owner}/${repo}/archive/${if rev != null then rev else tag}.tar.gz";
            outputHash = hash;
            outputHashMode = "recursive";
          };
        };

      autoPatchelfHook = tool "auto-patchelf-hook" "0" "auto-patchelf";
      zlib = mkFake {
        name = "zlib-1.3.1";
        outputs = [
          "out"
          "dev"
        ];
      };

      coreutils = tool "coreutils" "9.8" "coreutils";
      findutils = tool "findutils" "4.10.0" "find";
      ruff = tool "ruff" "0.14.0" "ruff";
      nixfmt = tool "nixfmt" "1.1.0" "nixfmt";
      nixfmt-tree = tool "nixfmt-tree" "1.1.0" "treefmt";

      inherit cudaPackages;
      cudaPackages_12_9 = cudaPackages;

      pythonPackagesExtensions = [ ];
      python314 = import ./python.nix {
        inherit
          lib
          mkFake
          final
          cudaPackages
          ;
        config = config';
      };
      python3 = final.python314;
    };
in
lib.fix (builtins.foldl' (f: overlay: lib.extends overlay f) base overlays)
