/// The CPU fused expert block behind `Layers.combineExpertsWith Fused`: each expert's whole computation for
/// its rows (gather, projections, activation, weighted output, and the matching backward) as one custom
/// autograd function whose per-expert jobs run on the intra-op threads with one torch thread each.
/// Axes: T tokens, D model width, H expert hidden width, E experts, N kept (token, slot) assignments.
module Moe.FusedExperts

open System
open TorchSharp
open type TorchSharp.torch.nn
open Moe.Tensors
open Moe.Config

/// Expert jobs on the calling thread plus long-lived helper threads.
module private ExpertJobs =
    open System.Collections.Concurrent
    open System.Threading

    /// A background thread that runs posted work one item at a time with one intra-op torch thread. OpenMP's
    /// thread count is per thread: libtorch sets it lazily on a thread's first parallel op (from the global
    /// count), so the helper triggers that first and then sets its own.
    type Helper() =
        let requests = new BlockingCollection<struct ((unit -> unit) * ManualResetEventSlim)>()
        let loop () =
            torch.get_num_threads () |> ignore
            torch.set_num_threads 1
            for struct (work, finished) in requests.GetConsumingEnumerable() do
                work ()
                finished.Set()
        let thread = Thread(loop, IsBackground = true, Name = "moe-expert-jobs")
        do thread.Start()
        member _.Post(work: unit -> unit, finished: ManualResetEventSlim) = requests.Add(struct (work, finished))

    let private sync = obj ()
    let mutable private helpers : Helper[] = [||]

    let private helpersFor (count: int) : Helper[] =
        lock sync (fun () ->
            if helpers.Length < count then helpers <- Array.append helpers (Array.init (count - helpers.Length) (fun _ -> Helper()))
            helpers)

    /// Runs `job j` for j = 0 .. jobs-1 (taken in that order, each by one thread) on the caller and
    /// torch.get_num_threads() - 1 helpers, each with one intra-op thread; rethrows the first failure.
    let run (jobs: int) (job: int -> unit) : unit =
        let threads = min jobs (torch.get_num_threads ())
        if threads <= 1 then
            for j in 0 .. jobs - 1 do job j
        else
            let next = ref -1
            let failures = ConcurrentQueue<exn>()
            let drain () =
                use _ = torch.no_grad () // grad mode is per thread; the jobs are the function's own arithmetic
                let mutable j = Interlocked.Increment &next.contents
                while j < jobs do
                    (try job j with e -> failures.Enqueue e)
                    j <- Interlocked.Increment &next.contents
            let finished = Array.init (threads - 1) (fun _ -> new ManualResetEventSlim(false))
            let pool = helpersFor (threads - 1)
            for i in 0 .. threads - 2 do pool[i].Post(drain, finished[i])
            let restore = torch.get_num_threads ()
            torch.set_num_threads 1
            try
                drain ()
                for f in finished do f.Wait()
            finally
                torch.set_num_threads restore
                for f in finished do f.Dispose()
            match failures.TryPeek() with
            | true, e -> raise (InvalidOperationException("an expert job failed: " + e.Message, e))
            | _ -> ()

/// A parameter whose gradient the fused backward accumulates in place. A holder, because AutogradContext
/// data must not be a Tensor.
type private GradTarget = { Param: Tensor }

/// What one forward of the fused block leaves for its backward.
type private BlockState =
    { Counts: int64[]
      /// Experts with at least one row, largest block first (long jobs start early).
      Active: int[]
      Activation: Activation
      Shape: int64[]
      NeedDx: bool
      NeedDw: bool
      Targets: GradTarget option[] }

module private Block =
    let list (xs: Tensor seq) = Collections.Generic.List<Tensor>(xs)

    let target (w: Tensor) : GradTarget option =
        if w.is_leaf && w.requires_grad then Some { Param = w } else None

    /// The activation output a from the first projection h (and SwiGLU's gate projection g). // [N_e; H]
    let activation (act: Activation) (h: Tensor) (g: Tensor) : Tensor =
        match act with
        | ReLU -> functional.relu h
        | GELU -> functional.gelu h
        | SwiGLU -> functional.silu h * g

    /// 1 / sqrt 2 and 1 / sqrt (2 pi), for the exact GELU derivative.
    let private invSqrt2 = 1.0 / Math.Sqrt 2.0
    let private invSqrt2Pi = 1.0 / Math.Sqrt(2.0 * Math.PI)

    /// Backpropagates through the activation, in place on `da` (which becomes dL/dh); returns dL/dg for SwiGLU.
    /// ReLU: 1[h > 0]. GELU (exact, Hendrycks & Gimpel 2016): Phi(h) + h phi(h).
    /// SwiGLU (Shazeer 2020), a = silu(h) g: dL/dg = da silu(h), dL/dh = da g sigma(h) (1 + h (1 - sigma(h))).
    let activationBackward (act: Activation) (h: Tensor) (g: Tensor) (da: Tensor) : Tensor =
        // every Scalar in a `use` binding: TorchSharp frees Scalars in finalizers (see Tensors.withScalar)
        use one = 1.0.ToScalar()
        match act with
        | ReLU ->
            use zero = 0.0.ToScalar()
            da.masked_fill_ (h.le zero, zero) |> ignore
            null
        | GELU ->
            use half = 0.5.ToScalar()
            use minusHalf = (-0.5).ToScalar()
            use invRoot2 = invSqrt2.ToScalar()
            use invRoot2Pi = invSqrt2Pi.ToScalar()
            let slope = h.mul(invRoot2).erf_().add_(one, one).mul_ half // Phi(h)
            let density = h.mul(h).mul_(minusHalf).exp_().mul_(invRoot2Pi).mul_ h // h phi(h)
            slope.add_ (density, one) |> ignore
            da.mul_ slope |> ignore
            null
        | SwiGLU ->
            let sigma = functional.sigmoid h
            let dg = da * (h * sigma) // da silu(h)
            let slope = sigma.neg().add_(one, one).mul_(h).add_(one, one).mul_ sigma // silu'(h) = sigma (1 + h (1 - sigma))
            da.mul_(g).mul_ slope |> ignore
            dg

    /// Where the expert jobs write a stacked weight gradient (sum over experts of input_e^T grad_e, one
    /// addmm_ per expert with the returned beta): a fused parameter's existing .grad (beta 1, accumulate); or a
    /// fresh tensor (beta 0, experts without rows zeroed) that becomes the parameter's .grad; or, for a weight
    /// that is not a leaf parameter (e.g. cast to bfloat16), a fresh tensor returned to autograd (third item;
    /// null otherwise).
    let weightGradTarget (state: BlockState) (target: GradTarget option) (weight: Tensor) : struct (Tensor * float32 * Tensor) =
        let existing = match target with Some t -> t.Param.grad | None -> null
        let fresh () =
            let g = torch.empty_like weight
            if state.Active.Length < state.Counts.Length then
                let blocks = g.unbind 0L
                for e in 0 .. state.Counts.Length - 1 do
                    if state.Counts[e] = 0L then blocks[e].zero_ () |> ignore
            g
        match target with
        | Some _ when not (isNull existing) && existing.shape = weight.shape && existing.dtype = weight.dtype ->
            struct (existing, 1.0f, null)
        | Some t ->
            let g = fresh ()
            t.Param.grad <- g
            struct (g, 0.0f, null)
        | None ->
            let g = fresh ()
            struct (g, 0.0f, g.MoveToOuterDisposeScope())

/// The whole expert computation for rows sorted by expert: out[t] = sum over rows n of token t of
/// w_n * E_{e(n)}(x_t), each expert block a job (`ExpertJobs.run`).
/// vars: x [T; D], token [N] int64 (grouped by expert), w [N], counts int64[E], activation,
/// W1 [E; D; H], W2 [E; H; D], (W3 [E; D; H]) -> out [T; D].
type internal ExpertBlock() =
    inherit torch.autograd.MultiTensorFunction<ExpertBlock>()
    override _.Name = "MoeExpertBlock"

    override _.forward(ctx: torch.autograd.AutogradContext, vars: obj[]) : Collections.Generic.List<Tensor> =
        let x, token, w = vars[0] :?> Tensor, vars[1] :?> Tensor, vars[2] :?> Tensor
        let counts, act = vars[3] :?> int64[], vars[4] :?> Activation
        let weights = vars[5..] |> Array.map (fun v -> v :?> Tensor) // W1, W2, (W3)
        let active = [| 0 .. counts.Length - 1 |] |> Array.filter (fun e -> counts[e] > 0L) |> Array.sortByDescending (fun e -> counts[e])
        use scope = torch.NewDisposeScope()
        let tokens, ws = token.split (counts, 0L), w.split (counts, 0L)
        let w1s, w2s = weights[0].unbind 0L, weights[1].unbind 0L
        let w3s = if weights.Length > 2 then weights[2].unbind 0L else [||]
        let rows, hs, gs, acts, ys = Array.zeroCreate active.Length, Array.zeroCreate active.Length, Array.zeroCreate active.Length, Array.zeroCreate active.Length, Array.zeroCreate active.Length
        ExpertJobs.run active.Length (fun j ->
            let e = active[j]
            use _ = torch.NewDisposeScope()
            let r = x.index_select (0L, tokens[e]) // [N_e; D]
            let h = r.mm w1s[e] // [N_e; H]
            let g = if w3s.Length = 0 then null else r.mm w3s[e] // [N_e; H]
            let a = Block.activation act h g // [N_e; H]
            let y = a.mm w2s[e] // [N_e; D]
            y.mul_ (ws[e].unsqueeze 1L) |> ignore
            rows[j] <- r.DetachFromDisposeScope()
            hs[j] <- h.DetachFromDisposeScope()
            gs[j] <- if isNull g then null else g.DetachFromDisposeScope()
            acts[j] <- a.DetachFromDisposeScope()
            ys[j] <- y.DetachFromDisposeScope())
        for t in Seq.concat [ rows; hs; gs; acts; ys ] do
            if not (isNull t) then scope.Attach t |> ignore
        let out = torch.zeros (x.shape, dtype = x.dtype, device = x.device) // [T; D]
        use one = 1.0.ToScalar() // held until the native calls return (see Tensors.withScalar)
        for j in Array.sortBy (fun j -> active[j]) [| 0 .. active.Length - 1 |] do
            out.index_add_ (0L, tokens[active[j]], ys[j], one) |> ignore // expert order: repeatable sums
        let kept = [ yield! rows; yield! hs; yield! acts; if weights.Length > 2 then yield! gs ]
        for t in kept do t.MoveToOuterDisposeScope() |> ignore
        ctx.save_for_backward (Block.list [ yield token; yield w; yield! weights; yield! kept ])
        ctx.save_data ("state",
            { Counts = counts; Active = active; Activation = act; Shape = x.shape; NeedDx = x.requires_grad
              NeedDw = w.requires_grad; Targets = weights |> Array.map Block.target })
        Block.list [ out.MoveToOuterDisposeScope() ]

    override _.backward(ctx: torch.autograd.AutogradContext, grads: Collections.Generic.List<Tensor>) : Collections.Generic.List<Tensor> =
        let saved = ctx.get_saved_variables ()
        let state = ctx.get_data "state" :?> BlockState
        let m, nw = state.Active.Length, state.Targets.Length
        use scope = torch.NewDisposeScope()
        let token, w = saved[0], saved[1]
        let weights = [| for i in 0 .. nw - 1 -> saved[2 + i] |]
        let at k = [| for j in 0 .. m - 1 -> saved[2 + nw + k * m + j] |]
        let rows, hs, acts = at 0, at 1, at 2
        let gs = if nw > 2 then at 3 else Array.create m null
        let gout = grads[0] // [T; D]
        let counts = state.Counts
        let tokens, ws = token.split (counts, 0L), w.split (counts, 0L)
        let w1s, w2s = weights[0].unbind 0L, weights[1].unbind 0L
        let w3s = if nw > 2 then weights[2].unbind 0L else [||]
        let sinks = Array.map2 (Block.weightGradTarget state) state.Targets weights
        let sink i = let struct (g, beta, _) = sinks[i] in g.unbind 0L, beta
        let (g1s, beta1), (g2s, beta2) = sink 0, sink 1
        let g3s, beta3 = if nw > 2 then sink 2 else [||], 0.0f
        let dw = if state.NeedDw then torch.empty_like w else null // [N]
        let dws = if isNull dw then [||] else dw.split (counts, 0L)
        let dRows = Array.zeroCreate m
        ExpertJobs.run m (fun j ->
            let e = state.Active[j]
            use _ = torch.NewDisposeScope()
            let gy = gout.index_select (0L, tokens[e]) // [N_e; D], the forward's sort reused: a gather
            let a = acts[j] // [N_e; H]
            let da = gy.mm (w2s[e].t ()) // [N_e; H], before the combine weight
            // dL/dw_n = gy_n . (a_n W2) = (gy_n W2^T) . a_n: the expert outputs need not be kept
            if not (isNull dw) then dws[e].copy_ ((da * a).sum 1L) |> ignore
            let scale = ws[e].unsqueeze 1L // [N_e; 1]
            da.mul_ scale |> ignore
            gy.mul_ scale |> ignore
            g2s[e].addmm_ (a.t (), gy, beta2, 1.0f) |> ignore
            let dg = Block.activationBackward state.Activation hs[j] gs[j] da // da is now dL/dh
            g1s[e].addmm_ (rows[j].t (), da, beta1, 1.0f) |> ignore
            if not (isNull dg) then g3s[e].addmm_ (rows[j].t (), dg, beta3, 1.0f) |> ignore
            if state.NeedDx then
                let dr = da.mm (w1s[e].t ()) // [N_e; D]
                if not (isNull dg) then dr.addmm_ (dg, w3s[e].t (), 1.0f, 1.0f) |> ignore
                dRows[j] <- dr.DetachFromDisposeScope())
        let dx =
            if state.NeedDx then
                for t in dRows do scope.Attach t |> ignore
                let dx = torch.zeros (state.Shape, dtype = gout.dtype, device = gout.device) // [T; D]
                use one = 1.0.ToScalar()
                for j in Array.sortBy (fun j -> state.Active[j]) [| 0 .. m - 1 |] do
                    dx.index_add_ (0L, tokens[state.Active[j]], dRows[j], one) |> ignore // expert order
                dx.MoveToOuterDisposeScope()
            else null
        let returned = sinks |> Array.map (fun struct (_, _, r) -> r)
        Block.list [ yield dx; yield null; yield (if isNull dw then null else dw.MoveToOuterDisposeScope()); yield null; yield null; yield! returned ]
