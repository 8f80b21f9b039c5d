// kstatus judges Kubernetes objects the way Flux and Helm 4's --wait do: it reads objects as JSON
// (one object, or a List such as `kubectl get -o json` prints) on stdin and prints, per object, one
// JSON line {"kind", "namespace", "name", "status", "message"} from sigs.k8s.io/cli-utils'
// status.Compute. Built and cached by hack/build-binaries.sh; used by the integration tests.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	// apimachinery's decoder keeps integers as int64, as unstructured objects must hold them.
	var obj map[string]interface{}
	if err := utiljson.Unmarshal(raw, &obj); err != nil {
		fail(err)
	}
	items := []interface{}{obj}
	if list, ok := obj["items"].([]interface{}); ok {
		items = list
	}
	out := json.NewEncoder(os.Stdout)
	for _, item := range items {
		m, ok := item.(map[string]interface{})
		if !ok {
			fail(fmt.Errorf("not an object: %v", item))
		}
		u := &unstructured.Unstructured{Object: m}
		res, err := status.Compute(u)
		if err != nil {
			fail(err)
		}
		if err := out.Encode(verdict{u.GetKind(), u.GetNamespace(), u.GetName(), res.Status.String(), res.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(1)
}
