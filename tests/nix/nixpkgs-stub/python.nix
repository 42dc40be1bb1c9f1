# python314 and its package set for the stand-in. Only the packages listed in `known` exist, at the
# versions of the pinned nixpkgs revision, so `ps.<typo>` fails evaluation.
#
# buildPythonPackage models what nixpkgs' does at evaluation and at build time:
#   - `disabled = true` (e.g. `pythonAtLeast "3.14"`) refuses to evaluate;
#   - meta.broken, meta.platforms and unfree licences refuse to instantiate (./default.nix);
#   - pythonRuntimeDepsCheckHook: every `Requires-Dist` of the release (./requires-dist.json, made
#     from PyPI by ../requires-dist.py) must be installed (in dependencies or what they propagate)
#     at a version its specifier allows, unless removed (pythonRemoveDeps) or relaxed
#     (pythonRelaxDeps: a list of names, or `true` for all). Releases without recorded metadata
#     are not checked;
#   - the check phase: `passthru.runsTests` says whether a build would run a test suite
#     (doCheck and pytestCheckHook), the part of a local rebuild that is slow and can be flaky.
{
  lib,
  mkFake,
  final,
  config,
  cudaPackages,
  # `python3.override { packageOverrides = ...; }`: applied after pythonPackagesExtensions.
  packageOverrides ? (_: _: { }),
}@args:
let
  pythonVersion = "3.14";
  sitePackages = "lib/python${pythonVersion}/site-packages";

  requiresDist = builtins.fromJSON (builtins.readFile ./requires-dist.json);

  # name = { version; deps = nixpkgs' `dependencies`; ... more attributes of nixpkgs' package }
  known = {
    setuptools.version = "80.9.0";
    wheel.version = "0.46.1";
    numpy.version = "2.3.4";
    packaging.version = "25.0";
    filelock.version = "3.20.0";
    fsspec.version = "2025.10.0";
    click.version = "8.3.1";
    httpx.version = "0.28.1";
    # nixpkgs builds hf-xet from source (Rust). Its version at the pin is not confirmed; nixpkgs
    # has shipped 1.5.0, older than the 1.5.2 huggingface-hub >= 1.28 asks for, with a hub that
    # relaxes the bound (below). The tests also cover a new enough one.
    hf-xet = {
      version = "1.5.0";
      doCheck = false;
    };
    tqdm.version = "4.67.1";
    typing-extensions.version = "4.15.0";
    typer.version = "0.20.0";
    regex.version = "2025.11.3";
    scipy.version = "1.16.3";
    pandas.version = "2.3.3";
    # At least what nixpkgs' datasets 5.1.0 requires (>= 24.0.0).
    pyarrow.version = "24.0.0";
    dill.version = "0.4.0";
    multiprocess.version = "0.70.18";
    xxhash.version = "3.6.0";
    rich.version = "14.2.0";
    psutil.version = "7.1.3";
    protobuf.version = "6.33.1";
    pyyaml.version = "6.0.3";
    # torch's pure-Python requirements (the wheel torch takes them from nixpkgs).
    jinja2.version = "3.1.6";
    networkx.version = "3.5";
    sympy.version = "1.14.0";
    safetensors.version = "0.8.0";
    tensorboard.version = "2.21.0";
    pytest.version = "9.0.1";
    pytest-xdist.version = "3.8.0"; # pkgs/development/python-modules/pytest-xdist (the test extra)
    ruff.version = "0.14.0";
    requests.version = "2.32.5";
    pillow.version = "12.0.0";
    # For playbooks/llama-factory: what LLaMA-Factory, gradio and their pinned releases need.
    # Versions not read from nixpkgs' source: only what the Requires-Dist check compares matters.
    hatchling.version = "1.27.0";
    torchdata.version = "0.11.0";
    einops.version = "0.8.1";
    sentencepiece.version = "0.2.1";
    tiktoken.version = "0.12.0";
    modelscope.version = "1.31.0";
    hf-transfer.version = "0.1.9";
    # Newer than LLaMA-Factory's cap (<=16.0.0); playbooks/llama-factory/python.nix relaxes it.
    av.version = "16.0.1";
    fire.version = "0.7.1";
    omegaconf.version = "2.3.0";
    pydantic.version = "2.12.4";
    uvicorn.version = "0.38.0";
    fastapi.version = "0.121.1";
    starlette.version = "0.49.3";
    sse-starlette.version = "3.0.3";
    gradio.version = "5.49.1";
    gradio-client.version = "1.13.3";
    tyro.version = "1.0.5";
    docstring-parser.version = "0.17.0";
    shtab.version = "1.7.2";
    aiofiles.version = "25.1.0";
    aiohttp.version = "3.13.2";
    anyio.version = "4.11.0";
    audioop-lts.version = "0.2.2";
    brotli.version = "1.2.0";
    ffmpy.version = "0.6.4";
    groovy.version = "0.1.2";
    markupsafe.version = "3.0.3";
    orjson.version = "3.11.4";
    pydub.version = "0.25.1";
    python-multipart.version = "0.0.20";
    safehttpx.version = "0.1.7";
    semantic-version.version = "2.10.0";
    tomlkit.version = "0.13.3";
    websockets.version = "15.0.1";
    # nixpkgs' torchvision and torchaudio follow torch: with a CUDA torch they compile CUDA code
    # with nvcc, from torch.cudaPackages (torchvision) or the set's cudaPackages (torchaudio, also
    # against torch.cxxdev). The wheel torch has neither, so there they do not evaluate.
    torchvision = {
      version = "0.28.0";
      deps = [
        "numpy"
        "pillow"
        "torch"
      ];
      withSet = ps: {
        nativeBuildInputs = lib.optionals ps.torch.cudaSupport [ ps.torch.cudaPackages.cuda_nvcc ];
      };
    };
    torchaudio = {
      version = "2.13.0";
      deps = [ "torch" ];
      withSet = ps: {
        nativeBuildInputs = lib.optionals ps.torch.cudaSupport [ cudaPackages.cuda_nvcc ];
        buildInputs = lib.optionals ps.torch.cudaSupport [ ps.torch.cxxdev ];
      };
    };
    # nixpkgs builds gguf from llama.cpp's gguf-py and versions it with llama.cpp's build number.
    gguf = {
      version = "9967";
      deps = [
        "numpy"
        "pyyaml"
        "requests"
        "tqdm"
      ];
    };
    matplotlib = {
      version = "3.10.5";
      deps = [
        "numpy"
        "packaging"
        "pillow"
      ];
    };
    huggingface-hub = {
      version = "1.28.0";
      deps = [
        "click"
        "filelock"
        "fsspec"
        "hf-xet"
        "httpx"
        "packaging"
        "pyyaml"
        "tqdm"
        "typing-extensions"
      ];
      # Its release asks for click >= 8.4.2 and hf-xet >= 1.5.2, newer than nixpkgs' own.
      pythonRelaxDeps = [
        "click"
        "hf-xet"
      ];
    };
    tokenizers = {
      version = "0.23.2";
      deps = [ "huggingface-hub" ];
    };
    # With CUDA, nixpkgs' triton finds the CUDA toolkit's ptxas itself: it applies
    # 0004-nvidia-allow-static-ptxas-path.patch with this value (cuda_nvcc's ptxas).
    # (Its version is not read from nixpkgs; only the ptxas patch matters to the tests.)
    triton = {
      version = "3.5.0";
      deps = [
        "filelock"
        "setuptools"
      ];
    }
    // lib.optionalAttrs config.cudaSupport {
      nixpkgsExtraBinaryPaths = lib.escapeShellArgs [
        (lib.getExe' cudaPackages.cuda_nvcc "ptxas")
      ];
    };
    torch = {
      version = "2.13.0";
      deps = [
        "filelock"
        "fsspec"
        "jinja2"
        "networkx"
        "numpy"
        "packaging"
        "setuptools"
        "sympy"
        "typing-extensions"
      ]
      ++ lib.optional config.cudaSupport "triton";
      inherit (config) cudaSupport;
      cudaCapabilities = if config.cudaSupport then cudaPackages.flags.cudaCapabilities else [ ];
      cudaToolkit = if config.cudaSupport then [ cudaPackages.cuda_nvcc ] else [ ];
      passthru = {
        inherit (config) cudaSupport;
        inherit cudaPackages;
      };
    };
    transformers = {
      version = "5.5.4";
      deps = [
        "huggingface-hub"
        "numpy"
        "packaging"
        "pyyaml"
        "regex"
        "safetensors"
        "tokenizers"
        "tqdm"
        "typer"
      ];
      doCheck = false;
    };
    datasets = {
      version = "5.1.0";
      deps = [
        "dill"
        "filelock"
        "fsspec"
        "huggingface-hub"
        "multiprocess"
        "numpy"
        "pandas"
        "pyarrow"
        "pyyaml"
        "tqdm"
        "xxhash"
      ];
      pythonRelaxDeps = [
        "dill"
        "multiprocess"
        "fsspec"
      ];
      doCheck = false;
    };
    # nixpkgs runs accelerate's test suite: pytestCheckHook over `tests`.
    accelerate = {
      version = "1.12.0";
      deps = [
        "huggingface-hub"
        "numpy"
        "packaging"
        "psutil"
        "pyyaml"
        "safetensors"
        "torch"
      ];
      checkHooks = [ "pytestCheckHook" ];
      enabledTestPaths = [ "tests" ];
    };
    peft = {
      version = "0.18.0";
      deps = [
        "accelerate"
        "huggingface-hub"
        "numpy"
        "packaging"
        "psutil"
        "pyyaml"
        "safetensors"
        "torch"
        "tqdm"
        "transformers"
      ];
    };
    trl = {
      version = "0.25.1";
      deps = [
        "accelerate"
        "datasets"
        "rich"
        "transformers"
      ];
    };
    bitsandbytes = {
      version = "0.48.2";
      deps = [
        "scipy"
        "torch"
      ];
      inherit (config) cudaSupport;
      cmakeFlags = [
        "-DCOMPUTE_BACKEND:STRING=${if config.cudaSupport then "cuda" else "cpu"}"
      ];
      # nixpkgs compiles its CUDA kernels with nvcc.
      nativeBuildInputs = lib.optionals config.cudaSupport [ cudaPackages.cuda_nvcc ];
      passthru = {
        inherit (config) cudaSupport;
        inherit cudaPackages;
      };
    };
  };

  # PEP 440 specifiers, as far as the recorded releases use them: ">=1.5.2,<2.0.0", "==1.2.*".
  # Release numbers compare as if padded with zeros (13.0.3 == 13.0.3.0), unlike compareVersions.
  satisfies =
    version: specifier:
    let
      trimZeros =
        v:
        let
          parts = lib.splitString "." v;
        in
        if builtins.length parts > 1 && lib.last parts == "0" then
          trimZeros (lib.concatStringsSep "." (lib.init parts))
        else
          v;
      clauses = builtins.filter (c: c != "") (map lib.trim (lib.splitString "," specifier));
      holds =
        clause:
        let
          m = builtins.match "(~=|===|==|!=|<=|>=|<|>)[[:space:]]*([^[:space:]]+)" clause;
          op = builtins.elemAt m 0;
          bound = builtins.elemAt m 1;
          cmp = builtins.compareVersions (trimZeros version) (trimZeros bound);
          prefixMatch = p: lib.hasPrefix p (version + ".");
          equal =
            if lib.hasSuffix ".*" bound then prefixMatch (lib.removeSuffix "*" bound) else cmp == 0;
          compatible =
            let
              parts = lib.splitString "." bound;
            in
            cmp >= 0 && prefixMatch (lib.concatStringsSep "." (lib.init parts) + ".");
        in
        if m == null then
          throw "the stand-in cannot read the version specifier '${clause}'"
        else if op == ">=" then
          cmp >= 0
        else if op == "<=" then
          cmp <= 0
        else if op == ">" then
          cmp > 0
        else if op == "<" then
          cmp < 0
        else if op == "!=" then
          !equal
        else if op == "~=" then
          compatible
        else
          equal;
    in
    builtins.all holds clauses;

  # pythonRuntimeDepsCheckHook: the Requires-Dist of `pname` `version` against what is installed
  # with it (its dependencies and everything they propagate).
  runtimeDepsCheck =
    {
      pname,
      version,
      dependencies,
      relaxed,
      removed,
      wheel,
    }:
    let
      # The recorded Requires-Dist is the wheel's. PyTorch's CI adds the CUDA requirements to its
      # wheels (PYTORCH_EXTRA_INSTALL_REQUIREMENTS); a build from source does not declare them.
      fromWheelOnly =
        name: pname == "torch" && builtins.match "cuda-.*|nvidia-.*|triton" name != null;
      recorded = requiresDist.${pname}.${version} or null;
      requirements =
        if recorded == null || wheel then
          recorded
        else
          builtins.filter (r: !fromWheelOnly (builtins.head r)) recorded;
      closure = builtins.genericClosure {
        startSet = map (d: {
          key = d.pname or d.name;
          pkg = d;
        }) dependencies;
        operator =
          item:
          map (d: {
            key = d.pname or d.name;
            pkg = d;
          }) (item.pkg.dependencies or [ ]);
      };
      installed = builtins.listToAttrs (map (item: lib.nameValuePair item.key item.pkg) closure);
      problem =
        requirement:
        let
          name = builtins.elemAt requirement 0;
          specifier = builtins.elemAt requirement 1;
          isRelaxed = relaxed == true || builtins.elem name relaxed;
        in
        if builtins.elem name removed then
          [ ]
        else if !(installed ? ${name}) then
          [ "${name} not installed" ]
        else if isRelaxed || satisfies installed.${name}.version specifier then
          [ ]
        else
          [ "${name}${specifier} not satisfied by version ${installed.${name}.version}" ];
      problems = builtins.concatMap problem requirements;
    in
    if requirements == null || problems == [ ] then
      true
    else
      throw "python3.14-${pname}-${version}: pythonRuntimeDepsCheck failed: ${lib.concatStringsSep "; " problems}";

  buildPythonPackage =
    argsOrFn:
    let
      resolve = a: if builtins.isFunction a then lib.fix a else a;
      args = resolve argsOrFn;
      dependencies = args.dependencies or [ ];
      build-system = args.build-system or [ ];
      relaxed = args.pythonRelaxDeps or [ ];
      doCheck = args.doCheck or true;
      checkHooks = map (d: d.name) (args.nativeCheckInputs or [ ]);
      package = mkFake {
        name = "python${pythonVersion}-${args.pname}-${args.version}";
        # The checks are derivation attributes, so they run when the package is instantiated (as
        # nixpkgs' run at build time), not when it is merely overridden.
        env = removeAttrs args [
          "passthru"
          "meta"
          "optional-dependencies"
          "disabled"
        ];
        checks = {
          inputsAreDerivations =
            builtins.all lib.isDerivation (dependencies ++ build-system)
            || throw "buildPythonPackage ${args.pname}: dependencies and build-system must be derivations";
          relaxDepsType =
            builtins.isBool relaxed
            || builtins.isList relaxed
            || throw "buildPythonPackage ${args.pname}: pythonRelaxDeps must be a list of names or a boolean";
          runtimeDepsCheck = runtimeDepsCheck {
            inherit (args) pname version;
            inherit dependencies relaxed;
            removed = args.pythonRemoveDeps or [ ];
            wheel = (args.format or null) == "wheel";
          };
        };
        meta = args.meta or { };
        passthru = (args.passthru or { }) // {
          runsTests = doCheck && builtins.elem "pytest-check-hook" checkHooks;
          overridePythonAttrs =
            f:
            buildPythonPackage (
              if builtins.isFunction argsOrFn then
                (
                  finalAttrs:
                  let
                    old = argsOrFn finalAttrs;
                  in
                  old // (if builtins.isFunction f then f old else f)
                )
              else
                argsOrFn // (if builtins.isFunction f then f argsOrFn else f)
            );
        };
      };
    in
    # nixpkgs: `disabled` packages refuse to evaluate for this interpreter.
    if args.disabled or false then
      throw "${args.pname}-${args.version} not supported for interpreter python${pythonVersion}"
    else
      package;

  hook =
    name:
    mkFake {
      inherit name;
      env.pname = name;
    };

  basePackages =
    pyfinal:
    builtins.mapAttrs (
      pname: spec:
      buildPythonPackage (
        {
          inherit pname;
          inherit (spec) version;
          pyproject = true;
          src = pyfinal.fetchPypi {
            inherit pname;
            inherit (spec) version;
            hash = "";
          };
          dependencies = map (d: pyfinal.${d}) (spec.deps or [ ]);
          nativeCheckInputs = map (h: pyfinal.${h}) (spec.checkHooks or [ ]);
          meta = { };
        }
        // removeAttrs spec [
          "version"
          "deps"
          "checkHooks"
          "withSet"
        ]
        # Attributes that depend on other packages of the set (as nixpkgs' `torch.cudaSupport`).
        // (spec.withSet or (_: { })) pyfinal
      )
    ) known
    // {
      inherit python buildPythonPackage;
      pythonAtLeast = lib.versionAtLeast pythonVersion;
      pythonOlder = lib.versionOlder pythonVersion;
      pytestCheckHook = hook "pytest-check-hook";
      fetchPypi =
        {
          pname,
          version,
          hash,
          ...
        }:
        mkFake {
          name = "${pname}-${version}.tar.gz";
          env = {
            inherit pname version;
            pypiHash = hash;
          };
        };
      callPackage =
        fn: args:
        let
          f = if builtins.isFunction fn then fn else import fn;
        in
        f (builtins.intersectAttrs (builtins.functionArgs f) (final // pyfinal) // args);
    };

  pkgs = lib.fix (
    builtins.foldl' (f: ext: lib.extends ext f) basePackages (
      final.pythonPackagesExtensions ++ [ packageOverrides ]
    )
  );

  python = mkFake {
    name = "python3-${pythonVersion}.0";
    env = {
      version = "${pythonVersion}.0";
    };
    passthru = {
      inherit pythonVersion sitePackages pkgs;
      interpreter = "${python}/bin/python3";
      override =
        {
          packageOverrides ? (_: _: { }),
          ...
        }:
        import ./python.nix (args // { inherit packageOverrides; });
      withPackages =
        f:
        let
          selected = f pkgs;
        in
        assert
          builtins.isList selected || throw "python3.withPackages: the function must return a list";
        assert
          builtins.all lib.isDerivation selected
          || throw "python3.withPackages: every element must be a package";
        mkFake {
          name = "python3-${pythonVersion}.0-env";
          env = {
            packages = selected;
            packageNames = map (p: p.pname) selected;
          };
          passthru = {
            inherit python pkgs;
          };
        };
    };
  };
in
python
