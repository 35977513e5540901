// Command minio-iam provisions a MinIO user with a canned policy through the MinIO admin API,
// so tests can sign STS AssumeRole calls with a non-root user's keys (as the broker does).
//
// Secrets come from the environment, never from argv (argv is visible in ps):
// MINIO_ROOT_USER, MINIO_ROOT_PASSWORD (admin) and IAM_USER_SECRET (the new user's secret key).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/minio/madmin-go/v3"
)

func main() {
	endpoint := flag.String("endpoint", "", "MinIO host:port (plain HTTP unless -ca is given)")
	ca := flag.String("ca", "", "PEM file of the CA MinIO's TLS certificate chains to (HTTPS)")
	user := flag.String("user", "", "access key of the user to create")
	policyName := flag.String("policy-name", "", "name of the canned policy to create and attach")
	policyFile := flag.String("policy-file", "", "path of the IAM policy JSON")
	flag.Parse()
	if err := run(*endpoint, *ca, *user, *policyName, *policyFile); err != nil {
		fmt.Fprintf(os.Stderr, "minio-iam: %v\n", err)
		os.Exit(1)
	}
}

func run(endpoint, ca, user, policyName, policyFile string) error {
	if endpoint == "" || user == "" || policyName == "" || policyFile == "" {
		return fmt.Errorf("-endpoint, -user, -policy-name and -policy-file are all required")
	}
	secret := os.Getenv("IAM_USER_SECRET")
	if secret == "" {
		return fmt.Errorf("IAM_USER_SECRET is not set")
	}
	policy, err := os.ReadFile(policyFile)
	if err != nil {
		return fmt.Errorf("reading policy: %w", err)
	}
	admin, err := madmin.New(endpoint, os.Getenv("MINIO_ROOT_USER"), os.Getenv("MINIO_ROOT_PASSWORD"), ca != "")
	if err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return fmt.Errorf("reading -ca: %w", err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("-ca %s holds no PEM certificate", ca)
		}
		admin.SetCustomTransport(&http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := admin.AddCannedPolicy(ctx, policyName, policy); err != nil {
		return fmt.Errorf("adding policy %q: %w", policyName, err)
	}
	if err := admin.AddUser(ctx, user, secret); err != nil {
		return fmt.Errorf("adding user %q: %w", user, err)
	}
	if _, err := admin.AttachPolicy(ctx, madmin.PolicyAssociationReq{Policies: []string{policyName}, User: user}); err != nil {
		return fmt.Errorf("attaching policy %q to %q: %w", policyName, user, err)
	}
	return nil
}
