// Builds a sparse MoE layer from C#, runs one forward and backward pass, and prints the routing statistics.
using Moe;
using TorchSharp;
using static Moe.Layers;

namespace MoeExample;

public static class Program
{
    // A small layer: 4 experts, top-2, SwiGLU experts, capacity factor 1.25 (Switch Transformer's usual value).
    const int ModelDim = 32;
    const int ExpertHidden = 64;
    const int Experts = 4;
    const int K = 2;
    const double CapacityFactor = 1.25;
    const int Tokens = 256;
    const int Seed = 7;

    public static int Main()
    {
        Run(Console.Out);
        return 0;
    }

    /// <summary>Runs the example, writing its report to <paramref name="output"/>.</summary>
    public static void Run(TextWriter output)
    {
        Native.initialise();
        Native.seedAll(Seed);
        using var scope = torch.NewDisposeScope();

        using var layer = MoeApi.CreateLayer(ModelDim, ExpertHidden, Experts, K,
                                             activation: "swiglu", capacityFactor: CapacityFactor);
        layer.train();
        var x = torch.randn(Tokens, ModelDim);
        var target = torch.randn(Tokens, ModelDim);

        MoeForwardResult result = MoeApi.Forward(layer, x);
        var loss = torch.nn.functional.mse_loss(result.Output, target) + MoeApi.WeightedAux(result.Aux);
        loss.backward();

        var tokensPerExpert = string.Join(" ", result.TokensPerExpert.Select(f => f.ToString("F3")));
        output.WriteLine($"MoE layer: {Experts} experts, top-{K}, d = {ModelDim}, expert hidden = {ExpertHidden}, {Tokens} tokens");
        output.WriteLine($"tokens per expert: {tokensPerExpert}");
        output.WriteLine($"dropped fraction: {result.DroppedFraction:F4}");
        output.WriteLine($"router entropy: {result.RouterEntropy:F4} nats");
        output.WriteLine($"aux losses: switch {result.Aux.SwitchAux.item<float>():F4}, importance {result.Aux.Importance.item<float>():F4}, " +
                         $"load {result.Aux.Load.item<float>():F4}, z {result.Aux.ZLoss.item<float>():F4}");
        output.WriteLine($"loss: {loss.item<float>():F4}");
        foreach (var (name, p) in layer.named_parameters())
            output.WriteLine($"grad norm {name}: {p.grad!.norm().item<float>():F6}");
    }
}
