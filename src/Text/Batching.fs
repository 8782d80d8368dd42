/// Token storage and batches for the encoder-decoder models: an in-memory tokenized set for small
/// corpora, an on-disk token cache that a 204k-document corpus streams from, and length-bucketed batches
/// with padding masks and truncation for teacher forcing.
/// Axes: B batch, S source positions, T target (decoder) positions.
module Moe.Batching

open System
open System.IO
open System.Runtime.InteropServices
open System.Text
open TorchSharp
open Moe.Tokenizers
open Moe.Data

/// Tokenized examples in model ids, read one at a time.
type ITokenSource =
    abstract Count: int
    abstract Specials: SpecialIds
    /// Document length in tokens, before truncation.
    abstract SourceLength: index: int -> int
    /// Summary length in tokens, before truncation (no bos/eos).
    abstract TargetLength: index: int -> int
    /// Model ids of the document and the summary (no bos/eos).
    abstract Read: index: int -> int[] * int[]
    abstract Id: index: int -> string
    abstract Label: index: int -> string option

/// Batch settings.
type BatchConfig =
    { /// Most examples in a batch.
      BatchSize: int
      /// Most padded source tokens (B * S) in a batch, so long-document buckets get fewer examples.
      MaxBatchTokens: int option
      /// Documents are cut to their first this-many tokens.
      MaxSourceTokens: int
      /// Decoder positions: a summary keeps at most MaxTargetTokens - 1 tokens, then bos/eos are added.
      MaxTargetTokens: int
      /// Examples are sorted by length within pools of BucketPool batches (fairseq-style bucketing):
      /// larger pools waste less padding, smaller pools keep batches more random.
      BucketPool: int
      /// Shuffle examples before pooling and batches after; off for evaluation.
      Shuffle: bool
      Seed: int }

module BatchConfig =
    /// XSum-sized defaults: 512 source tokens (the usual BART/PEGASUS XSum setting), 64 summary tokens.
    let defaults =
        { BatchSize = 32
          MaxBatchTokens = None
          MaxSourceTokens = 512
          MaxTargetTokens = 64
          BucketPool = 50
          Shuffle = true
          Seed = 0 }

    let validate (cfg: BatchConfig) : string list =
        [ if cfg.BatchSize < 1 then sprintf "BatchSize must be >= 1, got %d" cfg.BatchSize
          if cfg.MaxSourceTokens < 1 then sprintf "MaxSourceTokens must be >= 1, got %d" cfg.MaxSourceTokens
          if cfg.MaxTargetTokens < 2 then sprintf "MaxTargetTokens must be >= 2 (bos or eos plus one token), got %d" cfg.MaxTargetTokens
          if cfg.BucketPool < 1 then sprintf "BucketPool must be >= 1, got %d" cfg.BucketPool
          match cfg.MaxBatchTokens with
          | Some m when m < cfg.MaxSourceTokens ->
              sprintf "MaxBatchTokens (%d) must be >= MaxSourceTokens (%d) so the longest document fits" m cfg.MaxSourceTokens
          | _ -> () ]

let private check (cfg: BatchConfig) =
    match BatchConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" ("invalid batch config: " + String.Join("; ", problems))

/// A batch for teacher forcing. Masks are true at real tokens (false at padding), the convention of
/// `scaled_dot_product_attention`'s boolean mask. Dispose it, or create it inside the step's dispose scope.
type Batch =
    { /// Document tokens, truncated, padded with pad. // [B; S] int64
      Source: torch.Tensor
      /// True at document tokens. // [B; S] bool
      SourceMask: torch.Tensor
      /// bos + summary: the decoder's input. // [B; T] int64
      DecoderInput: torch.Tensor
      /// summary + eos: what the decoder predicts at each position; pad elsewhere. // [B; T] int64
      Target: torch.Tensor
      /// True where Target is a token to score (summary tokens and eos). // [B; T] bool
      TargetMask: torch.Tensor
      /// Document tokens per example after truncation.
      SourceLengths: int[]
      /// Scored target positions per example (summary tokens + eos).
      TargetLengths: int[]
      Ids: string[]
      Labels: string option[]
      /// Positions of the examples in their token source.
      Indices: int[] }

    /// Examples in the batch.
    member b.Size = b.Ids.Length
    /// Scored target tokens: the denominator of a per-token loss.
    member b.TargetTokens = Array.sum b.TargetLengths

    /// The same batch on `device` (new tensors; this batch keeps its own).
    member b.To(device: torch.Device) : Batch =
        { b with
            Source = b.Source.``to`` device
            SourceMask = b.SourceMask.``to`` device
            DecoderInput = b.DecoderInput.``to`` device
            Target = b.Target.``to`` device
            TargetMask = b.TargetMask.``to`` device }

    interface IDisposable with
        member b.Dispose() =
            for t in [ b.Source; b.SourceMask; b.DecoderInput; b.Target; b.TargetMask ] do t.Dispose()

// ---------------------------------------------------------------- in memory

/// Examples tokenized once and held in memory as model ids: for corpora of thousands of documents.
type TokenizedSet(tokenizer: ITokenizer, examples: Example[]) =
    let docs = examples |> Array.map (fun e -> tokenizer.Encode e.Document)
    let sums = examples |> Array.map (fun e -> tokenizer.Encode e.Summary)
    member _.Tokenizer = tokenizer
    member _.Examples = examples
    interface ITokenSource with
        member _.Count = examples.Length
        member _.Specials = tokenizer.Specials
        member _.SourceLength i = docs[i].Length
        member _.TargetLength i = sums[i].Length
        member _.Read i = docs[i], sums[i]
        member _.Id i = examples[i].Id
        member _.Label i = examples[i].Label

// ---------------------------------------------------------------- on disk

/// What a token cache holds, from its index.
type CacheInfo =
    { Path: string
      Count: int
      /// What the caller said the cache was built from (data path, split, config); `openOrBuild` rebuilds
      /// when it differs.
      Key: string
      /// The base encoder's fingerprint: a cache is only read with the same encoder.
      Fingerprint: string
      SourceTokens: int64
      TargetTokens: int64 }

/// An on-disk token cache, written once by `TokenCache.build` and read lazily: only the index (offsets,
/// lengths, ids, labels and base-id counts) is in memory; tokens are read per example when a batch
/// needs them.
///
/// Layout (little-endian): a 32-byte header `MOETOKC1`, version int32, reserved int32, count int64,
/// index offset int64 (0 while writing, so an interrupted build is never read); then each example's
/// document and summary base ids as int32; then the index: key, fingerprint, base size, per example
/// (offset int64, document length int32, summary length int32, id, label), and per base id its count.
type TokenCache private (path: string, info: CacheInfo, baseSize: int, offsets: int64[], srcLen: int[], tgtLen: int[],
                         ids: string[], labels: string option[], counts: int64[]) =
    // One read-only handle for all reads; RandomAccess.Read on it is safe from several threads.
    let handle = lazy (File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.RandomAccess))
    static let magic = Encoding.ASCII.GetBytes "MOETOKC1"
    static let version = 1
    static let headerBytes = 32
    // Examples encoded together by `Build`: enough to keep every core busy, few enough to stay small.
    static let encodeChunk = 512

    /// Opens a cache written by `build`; fails clearly on anything else or on an unfinished file.
    static member Open(path: string) : TokenCache =
        if not (File.Exists path) then raise (FileNotFoundException(sprintf "token cache not found: %s" path, path))
        use stream = File.OpenRead path
        use r = new BinaryReader(stream, Encoding.UTF8)
        let bad (what: string) = raise (InvalidDataException(sprintf "%s: not a usable token cache: %s" path what))
        if stream.Length < int64 headerBytes then bad "file shorter than the header"
        if r.ReadBytes 8 <> magic then bad "expected the MOETOKC1 header"
        let v = r.ReadInt32()
        if v <> version then bad (sprintf "expected version %d, got %d" version v)
        r.ReadInt32() |> ignore
        let count = r.ReadInt64()
        let indexAt = r.ReadInt64()
        if indexAt = 0L then bad "the build did not finish (no index); delete it and build again"
        if indexAt < int64 headerBytes || indexAt > stream.Length then bad (sprintf "index offset %d outside the file" indexAt)
        stream.Position <- indexAt
        let key = r.ReadString()
        let fingerprint = r.ReadString()
        let baseSize = r.ReadInt32()
        let n = int count
        let offsets = Array.zeroCreate<int64> n
        let srcLen = Array.zeroCreate<int> n
        let tgtLen = Array.zeroCreate<int> n
        let ids = Array.zeroCreate<string> n
        let labels = Array.zeroCreate<string option> n
        for i in 0 .. n - 1 do
            offsets[i] <- r.ReadInt64()
            srcLen[i] <- r.ReadInt32()
            tgtLen[i] <- r.ReadInt32()
            ids[i] <- r.ReadString()
            labels[i] <- if r.ReadBoolean() then Some(r.ReadString()) else None
        let counts = Array.init baseSize (fun _ -> r.ReadInt64())
        let info =
            { Path = path; Count = n; Key = key; Fingerprint = fingerprint
              SourceTokens = srcLen |> Array.sumBy int64; TargetTokens = tgtLen |> Array.sumBy int64 }
        new TokenCache(path, info, baseSize, offsets, srcLen, tgtLen, ids, labels, counts)

    /// Tokenizes `examples` with `encoder` (streaming: one chunk of examples in memory at a time) and writes the
    /// cache atomically: to `path.tmp`, renamed to `path` once complete.
    static member Build(encoder: IBaseEncoder, key: string, examples: seq<Example>, path: string) : CacheInfo =
        let tmp = path + ".tmp"
        let dir = Path.GetDirectoryName(Path.GetFullPath path)
        Directory.CreateDirectory dir |> ignore
        let counts = Array.zeroCreate<int64> encoder.Size
        let offsets = ResizeArray<int64>()
        let srcLen = ResizeArray<int>()
        let tgtLen = ResizeArray<int>()
        let ids = ResizeArray<string>()
        let labels = ResizeArray<string option>()
        do
            use stream = new FileStream(tmp, FileMode.Create, FileAccess.ReadWrite, FileShare.None)
            use w = new BinaryWriter(stream, Encoding.UTF8)
            w.Write magic
            w.Write version
            w.Write 0
            w.Write 0L
            w.Write 0L
            let write (tokens: int[]) =
                for t in tokens do
                    counts[t] <- counts[t] + 1L
                w.Write(MemoryMarshal.AsBytes(ReadOnlySpan<int>(tokens)))
            // Chunks are encoded on all cores and written in order; one chunk is in memory at a time.
            for chunk in Seq.chunkBySize encodeChunk examples do
                let encoded = chunk |> Array.Parallel.map (fun e -> encoder.Encode e.Document, encoder.Encode e.Summary)
                for e, (doc, sum) in Array.zip chunk encoded do
                    offsets.Add stream.Position
                    write doc
                    write sum
                    srcLen.Add doc.Length
                    tgtLen.Add sum.Length
                    ids.Add e.Id
                    labels.Add e.Label
            let indexAt = stream.Position
            w.Write key
            w.Write encoder.Fingerprint
            w.Write encoder.Size
            for i in 0 .. offsets.Count - 1 do
                w.Write offsets[i]
                w.Write srcLen[i]
                w.Write tgtLen[i]
                w.Write ids[i]
                match labels[i] with
                | Some l ->
                    w.Write true
                    w.Write l
                | None -> w.Write false
            for c in counts do w.Write c
            w.Flush()
            stream.Position <- 16L
            w.Write(int64 offsets.Count)
            w.Write indexAt
            w.Flush()
            stream.Flush true
        File.Move(tmp, path, true)
        { Path = path; Count = offsets.Count; Key = key; Fingerprint = encoder.Fingerprint
          SourceTokens = srcLen |> Seq.sumBy int64; TargetTokens = tgtLen |> Seq.sumBy int64 }

    member _.Info = info
    member _.Count = info.Count
    /// Occurrences of each base id over documents and summaries (for `Vocabulary.trimmed`).
    member _.Counts = counts
    member _.Id(i: int) = ids[i]
    member _.Label(i: int) = labels[i]
    member _.SourceLength(i: int) = srcLen[i]
    member _.TargetLength(i: int) = tgtLen[i]

    /// Base ids of example `i`'s document and summary, read from disk now.
    member _.ReadBase(i: int) : int[] * int[] =
        if i < 0 || i >= ids.Length then invalidArg "i" (sprintf "expected an example index in 0..%d, got %d" (ids.Length - 1) i)
        let all = Array.zeroCreate<int> (srcLen[i] + tgtLen[i])
        let bytes = MemoryMarshal.AsBytes(Span<int>(all))
        let got = RandomAccess.Read(handle.Force(), bytes, offsets[i])
        if got <> bytes.Length then
            raise (InvalidDataException(sprintf "%s: example %d is cut short (%d of %d bytes); rebuild the cache" path i got bytes.Length))
        all[.. srcLen[i] - 1], all[srcLen[i] ..]

    /// This cache as model ids of `tokenizer`, whose encoder must be the one the cache was built with.
    member this.WithTokenizer(tokenizer: Tokenizer) : ITokenSource =
        if tokenizer.Encoder.Fingerprint <> info.Fingerprint then
            invalidArg "tokenizer" (sprintf "expected a tokenizer with encoder %s (the cache's), got %s" info.Fingerprint tokenizer.Encoder.Fingerprint)
        let t = tokenizer :> ITokenizer
        { new ITokenSource with
            member _.Count = info.Count
            member _.Specials = t.Specials
            member _.SourceLength i = srcLen[i]
            member _.TargetLength i = tgtLen[i]
            member _.Read i =
                let d, s = this.ReadBase i
                tokenizer.ToModelIds d, tokenizer.ToModelIds s
            member _.Id i = ids[i]
            member _.Label i = labels[i] }

    /// Closes the file handle reads use.
    member _.Dispose() = if handle.IsValueCreated then handle.Value.Dispose()

    interface IDisposable with
        member this.Dispose() = this.Dispose()

module TokenCache =
    /// See `TokenCache.Build`.
    let build (encoder: IBaseEncoder) (key: string) (examples: seq<Example>) (path: string) : CacheInfo =
        TokenCache.Build(encoder, key, examples, path)

    /// See `TokenCache.Open`.
    let openRead (path: string) : TokenCache = TokenCache.Open path

    /// Opens the cache at `path` when it was built with this encoder and key; otherwise builds it from
    /// `examples` (which are only enumerated then).
    let openOrBuild (encoder: IBaseEncoder) (key: string) (examples: seq<Example>) (path: string) : TokenCache =
        let fresh =
            File.Exists path
            && (try
                    use c = TokenCache.Open path
                    c.Info.Key = key && c.Info.Fingerprint = encoder.Fingerprint
                with :? InvalidDataException -> false)
        if not fresh then TokenCache.Build(encoder, key, examples, path) |> ignore
        TokenCache.Open path

    /// A tokenizer whose vocabulary is the base ids this (training) cache saw at least `minCount` times.
    let tokenizer (encoder: IBaseEncoder) (minCount: int) (cache: TokenCache) : Tokenizer =
        if encoder.Fingerprint <> cache.Info.Fingerprint then
            invalidArg "encoder" (sprintf "expected encoder %s (the cache's), got %s" cache.Info.Fingerprint encoder.Fingerprint)
        Tokenizer(encoder, Vocabulary.trimmed encoder minCount cache.Counts)

// ---------------------------------------------------------------- batches

/// How many examples `cfg` truncates.
type TruncationStats =
    { Total: int
      SourcesTruncated: int
      TargetsTruncated: int }

/// Counts the documents longer than `MaxSourceTokens` and summaries longer than `MaxTargetTokens - 1`.
let truncation (cfg: BatchConfig) (source: ITokenSource) : TruncationStats =
    check cfg
    let mutable s = 0
    let mutable t = 0
    for i in 0 .. source.Count - 1 do
        if source.SourceLength i > cfg.MaxSourceTokens then s <- s + 1
        if source.TargetLength i > cfg.MaxTargetTokens - 1 then t <- t + 1
    { Total = source.Count; SourcesTruncated = s; TargetsTruncated = t }

let private permutation (rng: Random) (n: int) =
    let a = Array.init n id
    rng.Shuffle a
    a

/// Groups example indices into batches for epoch `epoch`: (shuffled) pools of `BucketPool` batches are
/// sorted by truncated document length and cut into batches of at most `BatchSize` examples and
/// `MaxBatchTokens` padded source tokens; batch order is shuffled. Deterministic in (Seed, epoch).
let plan (cfg: BatchConfig) (source: ITokenSource) (epoch: int) : int[][] =
    check cfg
    // System.Random with a seed is a fixed algorithm across .NET versions; each epoch gets its own seed,
    // spaced by a prime so (seed, epoch) pairs do not collide for runs under that many epochs.
    let epochStride = 7919
    let rng = Random(cfg.Seed * epochStride + epoch)
    let n = source.Count
    let order = if cfg.Shuffle then permutation rng n else Array.init n id
    let len i = min cfg.MaxSourceTokens (max 1 (source.SourceLength i))
    let batches = ResizeArray<int[]>()
    for pool in order |> Array.chunkBySize (cfg.BatchSize * cfg.BucketPool) do
        let sorted = pool |> Array.sortBy len
        let current = ResizeArray<int>()
        let mutable longest = 0
        for i in sorted do
            let l = max longest (len i)
            let fitsTokens =
                match cfg.MaxBatchTokens with
                | Some m -> (current.Count + 1) * l <= m
                | None -> true
            if current.Count > 0 && (current.Count >= cfg.BatchSize || not fitsTokens) then
                batches.Add(current.ToArray())
                current.Clear()
                longest <- 0
            current.Add i
            longest <- max longest (len i)
        if current.Count > 0 then batches.Add(current.ToArray())
    let result = batches.ToArray()
    if cfg.Shuffle then rng.Shuffle result
    result

/// The batch of examples `indices`: documents truncated to `MaxSourceTokens`, summaries to
/// `MaxTargetTokens - 1`; DecoderInput = bos + summary, Target = summary + eos, both padded with pad.
let collate (cfg: BatchConfig) (source: ITokenSource) (indices: int[]) : Batch =
    check cfg
    if isNull indices || indices.Length = 0 then invalidArg "indices" "expected at least one example index"
    let sp = source.Specials
    let rows = indices |> Array.map (fun i ->
        if i < 0 || i >= source.Count then invalidArg "indices" (sprintf "expected indices in 0..%d, got %d" (source.Count - 1) i)
        let d, s = source.Read i
        Array.truncate cfg.MaxSourceTokens d, Array.truncate (cfg.MaxTargetTokens - 1) s)
    let b = rows.Length
    let srcLens = rows |> Array.map (fun (d, _) -> d.Length)
    let tgtLens = rows |> Array.map (fun (_, s) -> s.Length + 1)
    let sLen = max 1 (Array.max srcLens)
    let tLen = Array.max tgtLens
    let src = Array.create (b * sLen) (int64 sp.Pad)
    let srcMask = Array.zeroCreate<bool> (b * sLen)
    let dec = Array.create (b * tLen) (int64 sp.Pad)
    let tgt = Array.create (b * tLen) (int64 sp.Pad)
    let tgtMask = Array.zeroCreate<bool> (b * tLen)
    rows |> Array.iteri (fun r (d, s) ->
        for j in 0 .. d.Length - 1 do
            src[r * sLen + j] <- int64 d[j]
            srcMask[r * sLen + j] <- true
        dec[r * tLen] <- int64 sp.Bos
        for j in 0 .. s.Length - 1 do
            dec[r * tLen + j + 1] <- int64 s[j]
            tgt[r * tLen + j] <- int64 s[j]
            tgtMask[r * tLen + j] <- true
        tgt[r * tLen + s.Length] <- int64 sp.Eos
        tgtMask[r * tLen + s.Length] <- true)
    let shapeS = [| int64 b; int64 sLen |]
    let shapeT = [| int64 b; int64 tLen |]
    { Source = torch.tensor(src, ReadOnlySpan<int64> shapeS)
      SourceMask = torch.tensor(srcMask, ReadOnlySpan<int64> shapeS)
      DecoderInput = torch.tensor(dec, ReadOnlySpan<int64> shapeT)
      Target = torch.tensor(tgt, ReadOnlySpan<int64> shapeT)
      TargetMask = torch.tensor(tgtMask, ReadOnlySpan<int64> shapeT)
      SourceLengths = srcLens
      TargetLengths = tgtLens
      Ids = indices |> Array.map source.Id
      Labels = indices |> Array.map source.Label
      Indices = Array.copy indices }

/// The batches of one epoch, each built (and its tokens read) only when enumerated.
let epoch (cfg: BatchConfig) (source: ITokenSource) (epochIndex: int) : seq<Batch> =
    let batches = plan cfg source epochIndex
    seq { for indices in batches -> collate cfg source indices }

/// Batches of consecutive examples in source order (no sorting, no shuffling): for evaluation and
/// generation, where output order should follow the input.
let sequential (cfg: BatchConfig) (source: ITokenSource) : seq<Batch> =
    seq { for indices in Array.init source.Count id |> Array.chunkBySize cfg.BatchSize -> collate cfg source indices }

/// The fraction of source positions in `batches` that are padding.
let paddingFraction (source: ITokenSource) (cfg: BatchConfig) (batches: int[][]) : float =
    let mutable padded = 0L
    let mutable real = 0L
    for b in batches do
        let lens = b |> Array.map (fun i -> min cfg.MaxSourceTokens (source.SourceLength i))
        padded <- padded + int64 (Array.max lens * b.Length)
        real <- real + (lens |> Array.sumBy int64)
    if padded = 0L then 0.0 else float (padded - real) / float padded
