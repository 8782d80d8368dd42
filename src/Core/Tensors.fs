/// Input checks and small helpers shared by every tensor module.
/// Axes: T tokens, D model width, E experts, K picks per token.
module Moe.Tensors

open System
open TorchSharp

type Tensor = torch.Tensor

/// `float32`, `int64`, ... as users write them.
let dtypeName (dt: torch.ScalarType) : string =
    match dt with
    | torch.ScalarType.Float32 -> "float32"
    | torch.ScalarType.Float64 -> "float64"
    | torch.ScalarType.BFloat16 -> "bfloat16"
    | torch.ScalarType.Float16 -> "float16"
    | torch.ScalarType.Int64 -> "int64"
    | torch.ScalarType.Int32 -> "int32"
    | torch.ScalarType.Bool -> "bool"
    | other -> (string other).ToLowerInvariant()

/// `[4; 3; 8] int64`: shape and dtype, the way error messages show them.
let describe (t: Tensor) : string =
    sprintf "[%s] %s" (t.shape |> Array.map string |> String.concat "; ") (dtypeName t.dtype)

/// True for floating dtypes the models run in.
let isFloating (t: Tensor) : bool =
    match t.dtype with
    | torch.ScalarType.Float32 | torch.ScalarType.Float64 | torch.ScalarType.BFloat16 | torch.ScalarType.Float16 -> true
    | _ -> false

/// Raises `ArgumentException` "expected NAME LAYOUT, got [..] dtype" unless `ok t`.
let expect (name: string) (layout: string) (ok: Tensor -> bool) (t: Tensor) : unit =
    if isNull t then invalidArg name (sprintf "expected %s %s, got null" name layout)
    elif not (ok t) then invalidArg name (sprintf "expected %s %s, got %s" name layout (describe t))

/// Checks rank and floating dtype: `expectFloat "logits" "[T; E]" 2 logits`.
let expectFloat (name: string) (layout: string) (rank: int) (t: Tensor) : unit =
    expect name (layout + " floating point") (fun t -> int t.Dimensions = rank && isFloating t) t

/// Checks rank and an integer dtype.
let expectIndex (name: string) (layout: string) (rank: int) (t: Tensor) : unit =
    expect name (layout + " int64") (fun t -> int t.Dimensions = rank && t.dtype = torch.ScalarType.Int64) t

/// Raises when `t` has a NaN or an infinity, naming the tensor.
let expectFinite (name: string) (t: Tensor) : unit =
    use finite = torch.isfinite(t).all ()
    if not (finite.item<bool> ()) then
        invalidArg name (sprintf "expected %s to be finite, got NaN or inf in %s" name (describe t))

/// Copies a tensor to a flat float32 array on the CPU.
let toFloats (t: Tensor) : float32[] =
    use c = t.detach().cpu().to_type(torch.ScalarType.Float32).contiguous().flatten ()
    c.data<float32>().ToArray()

/// Copies a tensor to a flat int64 array on the CPU.
let toInt64s (t: Tensor) : int64[] =
    use c = t.detach().cpu().to_type(torch.ScalarType.Int64).contiguous().flatten ()
    c.data<int64>().ToArray()

/// The one scalar in `t` as a float.
let scalar (t: Tensor) : float = t.detach().cpu().to_type(torch.ScalarType.Float64).item<float> ()

// ---------------------------------------------------------------- mixed precision

/// `t` in dtype `dt`: `t` itself when it already is (no copy), a differentiable cast otherwise.
let castTo (dt: torch.ScalarType) (t: Tensor) : Tensor = if t.dtype = dt then t else t.to_type dt

/// x W^T with the weight cast to x's dtype when they differ, so float32 master weights serve a bfloat16
/// pass (mixed precision, Micikevicius et al. 2018; the matmul-class ops of PyTorch's autocast). The cast
/// is differentiable: the gradient reaches W in float32. weight [Out; In], x [..; In] -> [..; Out] in x's dtype.
let linearCast (weight: Tensor) (x: Tensor) : Tensor =
    if weight.dtype = x.dtype then torch.nn.functional.linear (x, weight)
    else
        use w = weight.to_type x.dtype
        torch.nn.functional.linear (x, w)

/// A `Linear` layer through `linearCast`, its bias (if any) cast likewise. x [..; In] -> [..; Out] in x's dtype.
let linearLayerCast (layer: Modules.Linear) (x: Tensor) : Tensor =
    if layer.weight.dtype = x.dtype then layer.forward x
    elif isNull layer.bias then linearCast layer.weight x
    else
        use w = layer.weight.to_type x.dtype
        use b = layer.bias.to_type x.dtype
        torch.nn.functional.linear (x, w, b)

/// Number of tensors alive now (TorchSharp's count), for leak tests.
let liveTensors () : int64 = torch.Tensor.TotalCount

// ---------------------------------------------------------------- scalar operands kept alive

/// Why these helpers exist: TorchSharp 0.107's `Scalar` wraps a native `c10::Scalar*` and frees it
/// in a finalizer, and its tensor methods pass `scalar.Handle` to native code with no `GC.KeepAlive`.
/// A Scalar made on the fly - `t + 1.0`, `t * 2.0`, `t.mul_(v.ToScalar())`, and even `a + b`, whose
/// `add(target, 1)` makes an alpha Scalar inside TorchSharp - is unreachable once its handle is read,
/// so a GC on another thread can finalize it while libtorch still reads it: libtorch then fails in
/// `Scalar::toDouble` ("Expected false to be true", c10/core/Scalar.h) or reads a garbage value.
/// Parallel tests (many threads, frequent GCs) hit this about once in five full runs. Upstream:
/// dotnet/TorchSharp#1434 and #1496 ("Dispose Scalars implicitly created in Tensor operators"),
/// both open at 0.107. The helpers below hold every Scalar in a `use` binding (alive until Dispose,
/// after the native call) or in a static that is never finalized; use them on hot paths instead of
/// implicit .NET number -> Scalar conversions.

/// The alpha 1 of `a + b` (`add(target, 1)` in TorchSharp), rooted in a static so it is never
/// finalized; an integer, which libtorch accepts for integer and floating tensors alike.
let private unitAlpha : Scalar = (1L).ToScalar()

/// Runs `op` on `value` as a Scalar that stays alive until `op` has returned.
let withScalar (value: float) (op: Scalar -> Tensor) : Tensor =
    use s = value.ToScalar()
    op s

/// Runs `op` on the integer `value` as a Scalar that stays alive until `op` has returned.
let withInt64Scalar (value: int64) (op: Scalar -> Tensor) : Tensor =
    use s = value.ToScalar()
    op s

/// `t + value` with the Scalar kept alive (see above).
let addScalar (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.add (s, unitAlpha))

/// `t - value` with the Scalar kept alive.
let subScalar (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.sub s)

/// `value - t` with the Scalar kept alive.
let rsubScalar (value: float) (t: Tensor) : Tensor =
    use negated = t.neg ()
    withScalar value (fun s -> negated.add (s, unitAlpha))

/// `t * value` with the Scalar kept alive.
let mulScalar (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.mul s)

/// `t / value` with the Scalar kept alive.
let divScalar (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.div s)

/// In-place `t *= value` with the Scalar kept alive; returns `t`.
let mulScalar_ (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.mul_ s)

/// `max(t, value)` with the Scalar kept alive.
let clampMin (value: float) (t: Tensor) : Tensor = withScalar value (fun s -> t.clamp_min s)

/// `t^2` as `t * t`: TorchSharp's `square()` is `pow(2)` with a Scalar made on the fly.
let square (t: Tensor) : Tensor = t.mul t

/// softplus(t) = log(1 + e^t) as logaddexp(t, 0), exact and stable: TorchSharp's `softplus(beta, threshold)`
/// turns both doubles into Scalars on the fly.
let softplus (t: Tensor) : Tensor =
    use zero = torch.zeros_like t
    t.logaddexp zero

/// `a + b` with a rooted alpha, where TorchSharp's `a + b` would make one on the fly.
let plus (a: Tensor) (b: Tensor) : Tensor = a.add (b, unitAlpha)

/// In-place `a += b` with a rooted alpha (TorchSharp's `add_(b)` makes one on the fly); returns `a`.
let plus_ (a: Tensor) (b: Tensor) : Tensor = a.add_ (b, unitAlpha)

/// `torch.arange(start, stop)` with step 1 and its Scalars kept alive (TorchSharp's integer overloads make
/// them on the fly). // [stop - start]
let arange (start: int64) (stop: int64) (dtype: torch.ScalarType) (device: torch.Device) : Tensor =
    use first = start.ToScalar()
    use last = stop.ToScalar()
    torch.arange (first, last, unitAlpha, dtype = dtype, device = device)

/// `t * value` for an integer `value` with the Scalar kept alive.
let mulInt64 (value: int64) (t: Tensor) : Tensor = withInt64Scalar value (fun s -> t.mul s)
