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

/// Number of tensors alive now (TorchSharp's count), for leak tests.
let liveTensors () : int64 = torch.Tensor.TotalCount
